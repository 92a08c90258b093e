"""What a reward sees of one bot turn: the turns around it, and its votes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Context:
    """One bot turn in its conversation.

    ``prev_user`` is the user turn the bot answers (None if the bot spoke first),
    ``next_user`` the user's reply (None at the end of the conversation),
    ``earlier_bot`` the bot's previous turns in this conversation, oldest first,
    ``user_turns_after`` how many user turns follow in the conversation, and
    ``votes`` the explicit +1/-1 votes on this bot turn.
    """

    bot: str
    prev_user: str | None = None
    next_user: str | None = None
    earlier_bot: tuple[str, ...] = ()
    user_turns_after: int = 0
    votes: tuple[int, ...] = field(default=())
