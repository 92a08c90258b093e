"""Batch scoring of the store: every bot turn that needs it, then the combined reward.

Design
------
1. :meth:`Store.conversations_to_score` lists conversations with a bot turn that was
   never scored, was scored by another scorer version, or whose surroundings changed
   since (a user reply or a vote arrived: the fingerprint differs).
2. Those conversations are read in batches; every bot turn of a batch that needs it
   becomes a :class:`~rewards.context.Context` (a turn whose surroundings did not change
   keeps its values: a conversation that grew by one exchange rescores the turn the
   user answered); every signal scores the whole batch at once (each utterance is
   embedded once); the raw values and the scoring marks are written in one
   transaction. A kill loses at most the batch in flight, and a re-run picks up
   exactly the turns not yet marked: no turn is scored twice.
3. The normalisation statistics are refitted over all scored turns and the ``combined``
   reward of every bot turn is rewritten (idempotent, so it is safe to redo).
4. Once a reward model has been trained (``rapport reward-model train``), its
   ``learned_reward`` is scored beside the signals, and its id is part of the scorer
   version: a new reward model rescores every turn. Without one, scoring is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from bot.config import Config, rapport_home
from bot.store import Store
from rewards.combine import combine, fit_stats
from rewards.context import Context
from rewards.suite import COMBINED, SCORER_VERSION, SIGNAL_NAMES, score_contexts


@dataclass
class ScoreSummary:
    conversations: int
    bot_turns: int
    combined: int


def contexts_of(turns: list[dict]) -> list[tuple[dict, Context]]:
    """(bot message row, its Context) for every bot turn of one conversation that can be
    scored now: in a live conversation (rows with ``ended`` false) a bot turn the user has
    not answered yet is left out, to be scored once the user replies or the conversation
    ends (until then "no reply" does not mean "the user left").

    A reply a retry replaced (``replaced_by`` set) is off the conversation's path: it is
    scored at once (the retry was the user's answer to it), with the user turn it
    answered and no reply; the turns around it see the path only, as the bot did. A
    reply the safety filter withdrew (``unsafe``) is off the path the same way. The
    conversation's end-of-chat rating goes with its last bot turn on the path."""
    path = [t for t in turns if not t.get("replaced_by")]
    position = {t["id"]: k for k, t in enumerate(path)}
    last_bot = next((t["id"] for t in reversed(path) if t["role"] == "bot"), None)
    ended = all(bool(t.get("ended", True)) for t in turns)
    out = []
    earlier_bot: list[str] = []
    previous: dict | None = None  # the last turn of the path so far
    for turn in turns:
        replaced = bool(turn.get("replaced_by"))
        if turn["role"] != "bot":
            previous = turn
            continue
        prev_user = previous["text"] if previous and previous["role"] == "user" else None
        k = None if replaced else position[turn["id"]]
        after = path[k + 1] if k is not None and k + 1 < len(path) else None
        next_user = after["text"] if after and after["role"] == "user" else None
        if not replaced:
            previous = turn
        if next_user is None and not ended and after is None and not replaced:
            continue  # the last turn of a live conversation: the user may still answer
        context = Context(
            bot=turn["text"],
            prev_user=prev_user,
            next_user=next_user,
            earlier_bot=tuple(earlier_bot),
            votes=turn["votes"],
            replaced=replaced,
            rating=tuple(turn.get("rating") or ()) if turn["id"] == last_bot else (),
            reply_seconds=seconds_between(turn, after) if next_user is not None else None,
            unsafe=bool(turn.get("unsafe")),
        )
        out.append((turn, context))
        if not replaced:
            earlier_bot.append(turn["text"])
    return out


def seconds_between(turn: dict, reply: dict) -> float | None:
    """Seconds from a bot turn to the user's reply, on live chats (None elsewhere)."""
    if not turn.get("live") or not turn.get("created") or not reply.get("created"):
        return None
    delta = datetime.fromisoformat(reply["created"]) - datetime.fromisoformat(turn["created"])
    return delta.total_seconds()


class Learned:
    """The learned signals scored beside the others: ``learned(contexts)`` gives
    {signal name: values}; ``version`` names the models (a new one means rescoring)."""

    def __init__(self, signals: list) -> None:
        self.signals = signals
        self.version = "+".join(s.version for s in signals)

    def __call__(self, contexts: list[Context]) -> dict[str, list[float]]:
        return {s.__name__: s(contexts) for s in self.signals}


def learned_signal(folder: Path | None = None) -> Learned | None:
    """The learned signals: of the reward model in ``folder``, or by default of the
    newest trained on votes (``learned_reward``) and the newest trained on whether users
    continued (``learned_engagement``); None when there is none."""
    # torch and the reward model load only when one is used
    from rewards.learned_reward import TARGETS, latest_reward_model, learned_reward_signal

    home = rapport_home() / "reward_models"
    folders = [folder] if folder else [latest_reward_model(home, t) for t in TARGETS]
    signals = [learned_reward_signal(f) for f in folders if f]
    return Learned(signals) if signals else None


def scorer_version(learned=None) -> str:
    return f"{SCORER_VERSION}+{learned.version}" if learned else SCORER_VERSION


def score_batch(store: Store, conversation_ids: list[int], learned=None) -> int:
    """Score every bot turn of these conversations that can be scored now and commit;
    return how many. A turn still waiting for the user's answer loses any older score."""
    version = scorer_version(learned)
    conversations = store.conversation_turns(conversation_ids, version).values()
    pairs = [pair for turns in conversations for pair in contexts_of(turns)]
    scorable = {turn["id"] for turn, _ in pairs}
    waiting = [t["id"] for ts in conversations for t in ts if t["role"] == "bot"]
    store.clear_scores([m for m in waiting if m not in scorable])
    # the turns whose surroundings are as when they were scored keep their values: a
    # long conversation that grows by one exchange costs one or two turns, not all
    pairs = [(turn, context) for turn, context in pairs if turn["needs_scoring"]]
    if not pairs:
        return 0
    contexts = [context for _, context in pairs]
    values = score_contexts(contexts)
    if learned:
        values.update(learned(contexts))
    rows = [
        (turn["id"], name, v[i]) for name, v in values.items() for i, (turn, _) in enumerate(pairs)
    ]
    fingerprints = {turn["id"]: turn["fingerprint"] for turn, _ in pairs}
    store.save_scores(rows, fingerprints, version)
    return len(pairs)


def refit_combined(store: Store, weights: dict[str, float]) -> int:
    """Refit the per-signal statistics and rewrite every bot turn's combined reward."""
    table = store.reward_table(SIGNAL_NAMES)
    if not table:
        return 0
    stats = fit_stats(
        {name: [v[name] for v in table.values() if name in v] for name in SIGNAL_NAMES}
    )
    store.save_reward_stats(stats, SCORER_VERSION)
    store.set_rewards(
        (message_id, COMBINED, combine(raw, stats, weights), SCORER_VERSION)
        for message_id, raw in table.items()
    )
    return len(table)


def score_store(
    store: Store,
    config: Config,
    progress: Callable[[int], None] | None = None,
    learned=None,
) -> ScoreSummary:
    """End the conversations idle for ``scoring.idle_minutes``, score what needs scoring,
    in batches, then refit the combined reward.
    ``learned``: the :func:`learned_signal` to score too, if any. ``progress(k)``: k
    more bot turns scored."""
    store.end_idle_conversations(config.scoring.idle_minutes)
    pending = store.conversations_to_score(scorer_version(learned))
    size = config.scoring.batch_conversations
    bot_turns = 0
    for start in range(0, len(pending), size):
        batch = pending[start : start + size]
        scored = score_batch(store, batch, learned)
        bot_turns += scored
        if progress:
            progress(scored)  # the bot turns of the batch: what takes the time
    combined = refit_combined(store, asdict(config.weights))
    return ScoreSummary(len(pending), bot_turns, combined)
