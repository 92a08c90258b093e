"""The dialog engine every frontend talks to; frontends know nothing else.

Design
------
One :class:`Session` per (platform, channel, user) conversation. It owns the turn
history the model sees, and it is the only caller of the store for chat:

- ``respond(text)`` commits the user's turn *before* generating (a crash while the
  model runs never loses what the user said), streams the reply through ``on_text``,
  then commits the bot turn with the model version and generation settings. If the
  model raises, the user gets one readable line (:class:`GenerationError`) and the
  session stays usable. A ``KeyboardInterrupt`` while generating (Ctrl-C in the
  terminal) keeps and logs what was already shown, marked ``interrupted``, then
  propagates so the frontend can say so.
- ``retry()`` asks for another reply to the user turn the latest reply answered (the
  terminal's ``/retry``, a 🔁 reaction on Discord). The old reply stays in the log,
  marked replaced by the new one, and leaves the history the model sees; its votes stay
  on it. Only the latest reply of a live conversation can be retried; when generating
  fails or is stopped before any text, the old reply stays the conversation's.
- Votes go on the bot's own replies: ``vote(value, back=1)`` is the last reply,
  ``back=3`` the third-last; ``vote_message`` takes a message id (Discord reactions).
- ``rate(answers)`` stores the user's end-of-chat rating (1-5 on each of
  :data:`RATING_PROMPTS`' questions) of the conversation, or of the one that just ended
  (``/rate`` right after ``/new`` rates the finished chat); a second one replaces it.
  :func:`parse_rating` turns typed answers into one, or a one-line error.
- Opt-out: an opted-out user still gets replies, but nothing of theirs is written, and
  they are told so once per conversation (``notice``).
- Best-of-N (``generation.best_of`` > 1 and a reward model): the policy samples N
  replies together, the learned reward ranks them (:mod:`rewards.rank`), the chosen one
  is shown whole and logged with every candidate and its score.
- Safety (``safety``, a :class:`bot.safety.SafetyFilter`; config ``[safety]``): every
  reply is generated whole, unseen, and checked before it is shown; ``on_text`` then
  gets the checked reply in one piece. A flagged reply is regenerated once; if that one
  is flagged too, the neutral fallback is sent. Each flagged reply is logged as a
  withdrawn bot turn replaced by the next (the retry machinery: ``replaces``), with
  ``unsafe`` in its generation settings, so it leaves the conversation's path, scores
  ``bot_unsafe`` and no ``user_retry``, and votes go to the reply that was sent. With
  best-of-N a flagged candidate is never ranked while a safe one exists (its score is
  in the best-of record). A Ctrl-C before the check logs nothing: nothing was shown.
  The user's text is logged as written, never checked.
- The policy comes from a ``policy_source`` callable, asked once per reply, so a
  frontend can hand over a newly deployed model between turns; a reply being generated
  always finishes on the model it started with.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from bot.errors import InvalidInput, NotFound
from bot.policy import GenerationError, Policy, clean_reply
from bot.prompt import Turn
from bot.safety import SafetyFilter
from bot.store import Store, clean_text
from bot.store_ratings import RATING_QUESTIONS
from rewards.rank import rank

log = logging.getLogger(__name__)

CUT_MARK = " […]"
OPTED_OUT_NOTICE = (
    "You opted out of logging: this conversation is not saved. /optin allows it again."
)


# The questions of the end-of-chat rating, as people are asked them (1-5 each).
RATING_PROMPTS = {
    "overall": "Overall, how good was this conversation?",
    "fluency": "How fluent and natural were my replies?",
    "diversity": "How varied were my replies (not repeating myself)?",
    "relatedness": "How well did my replies relate to what you said?",
    "empathy": "How well did I understand how you felt?",
}
assert tuple(RATING_PROMPTS) == RATING_QUESTIONS


def parse_rating(answers: list[str]) -> dict[str, int]:
    """Typed answers, one a question in order, as a rating; a one-line error otherwise.

    >>> parse_rating("4 5 3 4 4".split())["empathy"]
    4
    """
    how = f"five whole numbers 1-5, for {', '.join(RATING_QUESTIONS)} (e.g. 4 5 3 4 4)"
    if len(answers) != len(RATING_QUESTIONS):
        raise InvalidInput(f"a rating is {how}; got {len(answers)}")
    bad = [a for a in answers if not (a.strip().isdigit() and 1 <= int(a) <= 5)]
    if bad:
        raise InvalidInput(f"{bad[0].strip() or 'nothing'!r} is not a rating: give {how}")
    return {q: int(a) for q, a in zip(RATING_QUESTIONS, answers, strict=True)}


@dataclass
class Reply:
    text: str  # as the model wrote it, and as it is logged
    message_id: int | None  # None when nothing was logged (opted out)
    model_version: str
    interrupted: bool = False
    cut: bool = False  # the length limit (generation.max_new_tokens) ended it
    withdrawn: int = 0  # replies the safety filter withdrew before this one was sent

    @property
    def shown(self) -> str:
        """The text as people see it: a cut reply says so. The mark is never logged (the
        learner trains on what the model wrote, and never on a cut reply's end)."""
        return self.text + CUT_MARK if self.cut else self.text


@dataclass
class Session:
    store: Store
    policy_source: Callable[[], Policy]
    platform: str
    platform_user_id: str
    channel: str = ""
    safety: SafetyFilter | None = None  # None: replies are sent unchecked
    user_id: str = field(init=False)
    conversation_id: int | None = field(init=False, default=None)
    previous_conversation_id: int | None = field(init=False, default=None)  # for /rate
    history: list[Turn] = field(init=False, default_factory=list)
    bot_message_ids: list[int] = field(init=False, default_factory=list)
    notice: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.user_id = self.store.ensure_user(self.platform, self.platform_user_id)
        self._told_opted_out = False

    # -- state ----------------------------------------------------------------------

    @property
    def opted_out(self) -> bool:
        return self.store.is_opted_out(self.user_id)

    def new_conversation(self, reason: str = "new") -> None:
        """End the logged conversation (``reason``: new, idle, ...) and forget the turn
        history; the next message starts a new logged conversation."""
        self.end(reason)
        if self.conversation_id is not None:
            self.previous_conversation_id = self.conversation_id
        self.conversation_id = None
        self.history = []
        self.bot_message_ids = []
        self._told_opted_out = False

    def end(self, reason: str) -> None:
        """Mark the logged conversation ended (quit, eof, idle, new): from then on a bot
        turn the user never answered counts as the end of the conversation."""
        if self.conversation_id is not None:
            self.store.end_conversation(self.conversation_id, reason)

    def _conversation(self, model_version: str) -> int | None:
        if self.opted_out:
            return None
        if self.conversation_id is None:
            self.conversation_id = self.store.start_conversation(
                self.user_id, self.platform, self.channel, model_version
            )
        return self.conversation_id

    # -- the turn -------------------------------------------------------------------

    def respond(self, text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Log the user's turn, generate and log the reply, and return it."""
        text = clean_text(text)
        policy = self.policy_source()
        self.notice = None
        if self.conversation_id is not None and self.store.conversation_ended(
            self.conversation_id
        ):  # ended while idle (`rapport score`, scoring.idle_minutes): a fresh start
            self.new_conversation()
        conversation = self._conversation(policy.version)
        if conversation is None and not self._told_opted_out:
            self.notice = OPTED_OUT_NOTICE
            self._told_opted_out = True
        if conversation is not None:
            self.store.add_message(conversation, "user", text)
        self.history.append(Turn("user", text))
        return self._generate(policy, conversation, on_text)

    def retry(
        self, on_text: Callable[[str], None] | None = None, message_id: int | None = None
    ) -> Reply:
        """Another reply to the user turn the latest reply answered (see module doc).
        ``message_id``: the reply the user asked to retry (a Discord reaction), refused
        unless it is the latest one."""
        if message_id is not None and message_id not in self.bot_message_ids[-1:]:
            raise InvalidInput("only the latest reply of a conversation can be retried")
        if not self.history or self.history[-1].role != "bot":
            raise NotFound(
                "no reply to retry yet"
                if not any(t.role == "bot" for t in self.history)
                else "your last message has no reply to retry; send it again"
            )
        if self.conversation_id is not None and self.store.conversation_ended(self.conversation_id):
            raise InvalidInput("this conversation has ended; say something to start a new one")
        policy = self.policy_source()
        self.notice = None
        conversation = None if self.opted_out else self.conversation_id
        replaced = self.bot_message_ids[-1] if conversation is not None else None
        old = self.history.pop()
        try:
            return self._generate(
                policy, conversation, on_text, replaces=replaced, saved="the last reply stays"
            )
        finally:
            if not self.history or self.history[-1].role != "bot":
                self.history.append(old)  # nothing came of it: the old reply stays

    def _generate(
        self,
        policy: Policy,
        conversation: int | None,
        on_text: Callable[[str], None] | None,
        replaces: int | None = None,
        saved: str = "your message was saved",
    ) -> Reply:
        """Generate a reply to the history, stream it, log it (see module doc)."""
        if self.safety is not None:
            return self._generate_checked(policy, conversation, on_text, replaces, saved)
        pieces: list[str] = []
        finish: dict = {}
        try:
            self._sample(policy, finish, pieces, on_text)
        except KeyboardInterrupt:
            self._finish(policy, conversation, pieces, {}, interrupted=True, replaces=replaces)
            raise
        except Exception as e:
            raise _failed(e, saved) from None
        return self._finish(policy, conversation, pieces, finish, replaces=replaces)

    def _sample(
        self,
        policy: Policy,
        finish: dict,
        pieces: list[str],
        on_text: Callable[[str], None] | None,
    ) -> None:
        """One reply, appended to ``pieces`` as it comes (kept if interrupted) and passed
        to ``on_text``: streamed, or best-of-N's chosen reply whole."""
        if getattr(policy, "best_of", 1) > 1:  # best-of-N needs a ranker (bot.policy)
            pieces.extend(self._best_of(policy, finish))
            if on_text and pieces:
                on_text(pieces[0])
            return
        for piece in policy.stream(self.history, finish):
            pieces.append(piece)
            if on_text:
                on_text(piece)

    def _generate_checked(
        self,
        policy: Policy,
        conversation: int | None,
        on_text: Callable[[str], None] | None,
        replaces: int | None,
        saved: str,
    ) -> Reply:
        """Safety on: generate unseen, check, regenerate once, else the fallback; log the
        flagged replies withdrawn, each replaced by the next, then show and log the reply
        sent (see module doc). Flagged replies are logged only once the reply that
        replaces them exists, so a Ctrl-C or a model error while regenerating never
        leaves a withdrawn reply on the conversation's path."""
        assert self.safety is not None
        withdrawn: list[tuple[str, dict, float]] = []  # (text, finish, score)
        try:
            for _ in range(2):  # the reply, then one regeneration
                finish: dict = {}
                pieces: list[str] = []
                self._sample(policy, finish, pieces, None)
                text = clean_reply("".join(pieces))
                (score,) = self.safety.scores([text])
                if not self.safety.flagged(score):
                    break
                withdrawn.append((text, finish, score))
            else:
                text, finish = self.safety.fallback, {"fallback": True}
        except Exception as e:
            raise _failed(e, saved) from None
        for flagged, attempt, score in withdrawn:
            if conversation is not None:
                generation = _generation(policy, attempt)
                generation["unsafe"] = self.safety.flag_record(score)
                replaces = self._log_bot(policy, conversation, flagged, generation, replaces)
            log.warning("safety: withdrew a reply (score %.3f)", score)
        if on_text and text:
            on_text(text)
        reply = self._finish(policy, conversation, [text], finish, replaces=replaces)
        reply.withdrawn = len(withdrawn)
        return reply

    def _best_of(self, policy: Policy, finish: dict) -> list[str]:
        """Best-of-N: sample ``policy.best_of`` replies together, rank them with the
        learned reward (:mod:`rewards.rank`), and return the chosen one as the only piece
        (nothing is shown until it is chosen). ``finish`` receives its cut flag and the
        record logged with it: every candidate with its score, and which was chosen (the
        ranking can be learned from, and chosen vs rejected is a preference pair)."""
        candidates = policy.sample_replies(self.history, policy.best_of)
        text = self.history[-1].text  # the user turn they answer
        texts = [c.text for c in candidates]
        kept = [i for i, t in enumerate(texts) if t]
        unsafe: list = [None] * len(texts)
        if self.safety is not None:  # a flagged candidate is never ranked (module doc)
            unsafe = self.safety.scores(texts)
            safe = [i for i in kept if not self.safety.flagged(unsafe[i])]
            kept = safe or kept  # all flagged: the best is flagged too, and regenerated
        chosen, scores = rank(text, texts, policy.ranker, policy.caution, kept)
        finish["cut"] = chosen is not None and candidates[chosen].cut
        finish["best_of"] = {
            "n": len(texts),
            "chosen": chosen,
            "caution": policy.caution,
            "ranker": getattr(policy.ranker, "version", None),
            "candidates": [
                {"text": c.text, "cut": c.cut, "mean": sc and sc[0], "spread": sc and sc[1]}
                | ({} if u is None else {"unsafe": round(u, 4)})
                for c, sc, u in zip(candidates, scores, unsafe, strict=True)
            ],
        }
        return [texts[chosen]] if chosen is not None else []

    def _finish(
        self,
        policy: Policy,
        conversation: int | None,
        pieces: list[str],
        finish: dict,
        *,
        interrupted: bool = False,
        replaces: int | None = None,
    ) -> Reply:
        reply = clean_reply("".join(pieces))
        if not reply:
            if interrupted:
                return Reply("", None, policy.version, interrupted=True)
            reply = "…"  # the model ended its turn at once; a bot turn is never empty
        message_id = None
        if conversation is not None:
            generation = _generation(policy, finish)
            if interrupted:
                generation["interrupted"] = True
            message_id = self._log_bot(policy, conversation, reply, generation, replaces)
            self.bot_message_ids.append(message_id)
        self.history.append(Turn("bot", reply))
        return Reply(reply, message_id, policy.version, interrupted, finish.get("cut", False))

    def _log_bot(
        self,
        policy: Policy,
        conversation: int,
        text: str,
        generation: dict,
        replaces: int | None,
    ) -> int:
        """Log a bot turn (replacing ``replaces``, which then takes no more votes)."""
        message_id = self.store.add_message(
            conversation,
            "bot",
            text,
            model_version=policy.version,
            generation=generation,
            replaces=replaces,
        )
        if replaces in self.bot_message_ids:
            self.bot_message_ids.remove(replaces)
        return message_id

    # -- feedback and privacy -------------------------------------------------------

    def vote(self, value: int, back: int = 1) -> int:
        """Vote on this conversation's ``back``-th last bot reply; return its message id."""
        if self.opted_out:
            raise InvalidInput("you opted out of logging, so votes are not recorded")
        if back < 1:
            raise InvalidInput("count replies back from 1 (the last reply)")
        if back > len(self.bot_message_ids):
            have = len(self.bot_message_ids)
            raise NotFound(
                "no reply to vote on yet"
                if not have
                else f"only {have} repl{'y' if have == 1 else 'ies'} in this conversation"
            )
        message_id = self.bot_message_ids[-back]
        self.store.vote(message_id, self.user_id, value)
        return message_id

    def vote_message(self, message_id: int, value: int) -> None:
        self.store.vote(message_id, self.user_id, value)

    def rate(self, answers: dict[str, int]) -> bool:
        """Rate this conversation, or the one that just ended (see module doc); return
        whether it replaced an earlier rating."""
        if self.opted_out:
            raise InvalidInput("you opted out of logging, so ratings are not recorded")
        conversation = self.conversation_id or self.previous_conversation_id
        if conversation is None:
            raise NotFound("no conversation to rate yet; chat first")
        return self.store.rate(conversation, self.user_id, answers)

    def forget_me(self) -> dict[str, int]:
        """Delete everything this user ever said or voted, then start afresh."""
        deleted = self.store.forget(self.user_id)
        self.new_conversation()
        self.previous_conversation_id = None  # forgotten: nothing left to rate
        self.user_id = self.store.ensure_user(self.platform, self.platform_user_id)
        return deleted

    def set_opt_out(self, opted_out: bool) -> None:
        self.store.set_opt_out(self.user_id, opted_out)
        self.new_conversation()


def _generation(policy: Policy, finish: dict) -> dict:
    """A bot turn's logged generation record: the settings, and how the reply ended."""
    generation = policy.settings.as_dict()
    if finish.get("cut"):
        generation["cut"] = True  # stopped by max_new_tokens, not by the model
    if finish.get("best_of"):
        generation["best_of"] = finish["best_of"]
    if finish.get("fallback"):
        generation["fallback"] = True  # the safety filter's line, not the model's
    return generation


def _failed(error: Exception, saved: str) -> GenerationError:
    log.exception("generation failed")
    return GenerationError(
        f"the model failed to reply ({type(error).__name__}: {error}); {saved}, try again"
    )
