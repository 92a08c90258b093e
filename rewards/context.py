"""What a reward sees of one bot turn: the turns around it, and its votes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Context:
    """One bot turn in its conversation.

    ``prev_user`` is the user turn the bot answers (None if the bot spoke first),
    ``next_user`` the user's reply (None at the end of the conversation),
    ``earlier_bot`` the bot's previous turns in this conversation, oldest first,
    ``votes`` the explicit +1/-1 votes on this bot turn, and ``replaced`` whether the
    user asked for another reply instead of this one (a retry: the conversation went on
    from the new reply, so this one has no ``next_user``), and ``rating`` the user's
    end-of-chat rating answers (1-5 each) on the conversation's last bot turn, () on
    every other turn and when the conversation is not rated; ``reply_seconds`` how long
    the user took to reply, on live chats only (None otherwise); ``unsafe`` whether
    the safety filter withdrew this reply before it was sent (then ``replaced`` too,
    by the regenerated or fallback reply, and not by the user).

    A signal reads nothing else: the turn, what came before it, the message after it,
    and what the store's fingerprint tracks (votes, rating, end); scoring relies on it
    to rescore only the turns whose surroundings changed (bot/store_data.FINGERPRINT).
    """

    bot: str
    prev_user: str | None = None
    next_user: str | None = None
    earlier_bot: tuple[str, ...] = ()
    votes: tuple[int, ...] = field(default=())
    replaced: bool = False
    rating: tuple[int, ...] = ()
    reply_seconds: float | None = None
    unsafe: bool = False
