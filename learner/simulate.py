"""Self-play with simulated users: how a policy does with people, without people.

Design
------
- A simulated user is a language model (the default prior unless another is given)
  prompted to play a person with a short persona; it opens with a real first line of a
  held-out chitchat conversation (conversations the learner never trains on: the last
  ones of the corpus).
- Self-play runs a batch of conversations in lock-step: all bots reply (one batched
  decoding), then all users (another), for ``turns`` bot turns. A simulated user
  ends its conversation by saying goodbye (or an empty line); finished conversations
  drop out of later batches.
- Seeded: the same seed gives the same personas, openers and samples.
- Paired (``paired=True``, what ``rapport eval`` and the gate play): every token is drawn
  with noise keyed by (seed, conversation, turn, token) (:func:`bot.policy.keyed_gumbel`),
  not from a shared random stream: common random numbers. Two models that would say the
  same thing in a conversation do (their users then answer alike too), so a comparison
  of versions measures the versions, not the luck of independent draws; and a
  conversation's draws do not depend on what is batched beside it. Each model's replies
  are still samples of its own distribution. ``rapport simulate`` plays keyed too: the
  learner's data are still ordinary samples of the deployed model, and the logs of a
  seed are the same whatever draws the decoder makes for other rows (how it groups
  prompts, how many it batches, a faster decoding path): the twelfth learning-loop
  run drew other logs from the same seed only because the decoder had changed
  (RESULTS.md).
- ``rapport simulate`` applies the chat's reply safety filter (:mod:`bot.safety`): the
  flagged replies of a round are regenerated together, once, and those flagged again
  get the fallback; each flagged reply is logged withdrawn, replaced by the next, as a
  chat logs it, so self-play carries ``bot_unsafe`` too. Evaluation (``rapport eval``,
  the gate) measures the model itself, unfiltered.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from bot.corpora import chitchat_conversations
from bot.policy import Settings, clean_reply, decode_rows, row_key
from bot.prompt import Turn, build_prompt
from bot.safety import SafetyFilter
from bot.store_data import Imported
from rewards.rank import rank

PERSONAS = [
    "a college student who loves video games and pizza",
    "a nurse who just finished a night shift",
    "a retired teacher who gardens and bakes bread",
    "a software developer who plays guitar in a band",
    "a high-school senior nervous about exams",
    "a parent of two small kids who loves hiking",
    "a chef who travels a lot for work",
    "a bored office worker on a lunch break",
]
USER_SYSTEM = (
    "You are {persona}, chatting casually with someone online. Write one short, natural "
    "message at a time, like a real person texting. Say 'bye' when you want to stop."
)
GOODBYES = ("bye", "goodbye", "see you", "see ya", "gotta go", "good night")
# People text in short messages; capping the simulated user's turn also keeps self-play
# cheap (a batch runs until its longest reply ends).
USER_MAX_TOKENS = 40


@dataclass
class SelfPlay:
    opener: str
    persona: str
    turns: list[Turn] = field(default_factory=list)  # user first, alternating
    ended_by_user: bool = False
    cut: set[int] = field(default_factory=set)  # indices of bot turns the length limit cut
    # turn index of a sent bot turn -> the generation records of the flagged replies the
    # safety filter withdrew before it, in order (text, and ``unsafe``, ``cut``)
    withdrawn: dict[int, list[dict]] = field(default_factory=dict)
    fallback: set[int] = field(default_factory=set)  # bot turns that are the fallback line
    # best-of-N: turn index of a sent bot turn -> the N sampled (reply, cut) it was chosen
    # from, in sampling order
    candidates: dict[int, list[tuple[str, bool]]] = field(default_factory=dict)
    # paired sampling: the key of each turn's draws is row_key(key, turn index), None
    # for unpaired play (see the module doc)
    key: int | None = None

    @property
    def bot_turns(self) -> list[str]:
        return [t.text for t in self.turns if t.role == "bot"]


OPENER_SPLITS = ("eval", "train")


@functools.cache
def opener_pool(split: str) -> tuple[str, ...]:
    """First user lines of the last chitchat conversations: ``eval`` draws from the last
    500, ``train`` (self-play logged for the learner, ``rapport simulate``) from the 500
    before them, so an evaluation never opens with a line the learner trained on. Read
    once a process: parsing the 40 MB corpus takes a second of CPU, and an evaluation
    plays every model, ``rapport simulate`` every batch, from the same pool."""
    last = list(chitchat_conversations())[-1000:]
    chosen = last[-500:] if split == "eval" else last[:-500]
    return tuple(c.turns[0][2] for c in chosen if c.turns)


def held_out_openers(n: int, seed: int, split: str = "eval") -> list[str]:
    """``n`` openers of ``split`` (:func:`opener_pool`), drawn with ``seed``."""
    pool = opener_pool(split)
    rng = random.Random(seed)
    if n <= len(pool):  # distinct openers: an evaluation of n prompts has n different ones
        return rng.sample(pool, n)
    return [rng.choice(pool) for _ in range(n)]


# Prompts are generated in groups of similar length: a left-padded batch pays for its
# longest prompt in every row (held-out openers: 52 tokens on average, 291 the longest),
# so one batch of 200 spent most of its prefill and attention on padding. Measured here
# (SmolLM2-135M bf16, 200 openers, 64 new tokens, 2 cores): one batch 161 s, groups of
# 16 / 32 / 64: 114 / 90 / 87 s.
GENERATE_GROUP = 64


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: list[list[int]],
    settings: Settings,
    cut: list | None = None,
    group: int | None = None,
    copies: int = 1,
    keys: list[int] | None = None,
) -> list[str]:
    """``copies`` sampled replies per prompt (side by side), in input order: the prompts
    sorted by length and generated ``group`` rows at a time, each group one left-padded
    batch (:func:`bot.policy.decode_rows`). If ``cut`` is a list, it receives for each
    reply whether the length limit ended it (no stop token was sampled), as the chat logs it (see
    :meth:`bot.policy.Policy.stream_tokens`). With ``copies`` > 1 (best-of-N) each prompt
    is read once and its cache repeated for its copies, as the chat samples best-of-N's
    candidates (:meth:`bot.policy.Policy.sample_replies`). ``keys`` (one per prompt):
    paired sampling (:func:`bot.policy.decode_rows`), copy ``c`` of prompt ``i``
    keyed :func:`copy_key` (``keys[i]``, ``c``). ``group``: default ``GENERATE_GROUP``."""
    group = group or GENERATE_GROUP
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[str] = [""] * (len(prompts) * copies)
    was_cut: list[bool] = [False] * (len(prompts) * copies)
    per_group = max(group // copies, 1)
    for start in range(0, len(order), per_group):
        picked = order[start : start + per_group]
        rows_keys = (
            None if keys is None else [copy_key(keys[i], c) for i in picked for c in range(copies)]
        )
        texts, cuts = _generate_group(
            model, tokenizer, [prompts[i] for i in picked], settings, copies, rows_keys
        )
        rows = [i * copies + c for i in picked for c in range(copies)]
        for row, text, flag in zip(rows, texts, cuts, strict=True):
            replies[row], was_cut[row] = text, flag
    if cut is not None:
        cut.extend(was_cut)
    return replies


def copy_key(key: int, copy: int) -> int:
    """The key of copy ``copy`` of a prompt keyed ``key``: the first copy is the prompt's
    own key, so best-of-N's first candidate is the reply a plain model draws."""
    return key if copy == 0 else row_key(key, copy)


def _generate_group(
    model, tokenizer, prompts, settings, copies: int = 1, keys: list[int] | None = None
) -> tuple[list[str], list[bool]]:
    """(replies, cut flags) of one left-padded batch (:func:`bot.policy.decode_rows`),
    ``copies`` rows a prompt side by side (each prompt read once, its cache repeated: the
    prefill is ~40% of a group's generation here, 64 openers, 64 new tokens); ``keys``,
    one per row: paired sampling."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, cuts = decode_rows(
        model,
        prompts,
        settings,
        set(tokenizer.all_special_ids),
        pad=pad,
        copies=copies,
        keys=keys,
    )
    texts = [clean_reply(tokenizer.decode(row, skip_special_tokens=True)) or "…" for row in tokens]
    return texts, cuts


@dataclass(frozen=True)
class Rerank:
    """Best-of-N in self-play: ``n`` sampled replies per bot turn, the one ``ranker``
    (user turn, replies) -> [(mean, spread)] ranks highest by mean - caution x spread."""

    n: int
    ranker: Callable[[str, list[str]], list[tuple[float, float]]]
    caution: float = 1.0

    def kl_bound(self) -> float:
        """KL(best-of-n ‖ base) per reply is at most log n - (n - 1)/n nats (Stiennon et
        al. 2020; Beirami et al. 2024): best-of-N has no per-token policy to measure."""
        return math.log(self.n) - (self.n - 1) / self.n


def best_of_batch(model, tokenizer, prompts, settings, rerank: Rerank, games, keys=None):
    """(replies, cut flags): ``rerank.n`` samples per prompt in one batched generation
    (the rows of a prompt lie side by side), each game's best by the ranking."""
    cut: list[bool] = []
    n = rerank.n
    many = generate_batch(model, tokenizer, prompts, settings, cut, copies=n, keys=keys)
    replies, flags = [], []
    for k, game in enumerate(games):
        drawn = range(k * n, (k + 1) * n)
        game.candidates[len(game.turns)] = [(many[i], cut[i]) for i in drawn]
        texts = [t if t != "…" else "" for t in many[k * n : (k + 1) * n]]
        chosen, _ = rank(game.turns[-1].text, texts, rerank.ranker, rerank.caution)
        replies.append(texts[chosen] if chosen is not None else "…")
        flags.append(chosen is not None and cut[k * n + chosen])
    return replies, flags


def first_candidates(games: list[SelfPlay]) -> list[SelfPlay]:
    """One-turn best-of-N games as the plain model's own: each bot turn replaced by the
    first of the N replies it was chosen from (each candidate is an independent sample of
    the model with the same settings, so the first one is what a plain self-play would
    have sampled: in distribution, and in paired play exactly, its key being the plain
    reply's); unanswered, as the best-of-N games must be."""
    out = []
    for game in games:
        plain = SelfPlay(game.opener, game.persona, turns=game.turns[:1])
        for k in sorted(game.candidates):
            text, was_cut = game.candidates[k][0]
            if was_cut:
                plain.cut.add(len(plain.turns))
            plain.turns.append(Turn("bot", text))
        out.append(plain)
    return out


def self_play(
    policy_model, user_model, tokenizer, *, rerank: Rerank | None = None, **play
) -> list[SelfPlay]:
    """``n`` conversations of up to ``turns`` bot turns each, batched across them, opened
    with lines of the ``split`` (see :func:`held_out_openers`); the keywords (``n``,
    ``turns``, ``seed``, ``system_prompt``, ``settings``, ...) are
    :func:`self_play_many`'s. ``answer_last=False`` leaves the last bot turn unanswered:
    for measures of the bot's replies alone (the question rate of one reply per opener),
    it saves the simulated users' last turn. ``rerank``: the bot plays best-of-N as the
    chat serves it (:mod:`rewards.rank`). ``safety``: check the bot's replies as a chat
    does (module doc)."""
    bot = Player(policy_model, rerank)
    return self_play_many({"bot": bot}, user_model, tokenizer, **play)["bot"]


@dataclass(frozen=True)
class Player:
    """A bot in :func:`self_play_many`: its model, and best-of-N if it plays it."""

    model: object
    rerank: Rerank | None = None


def self_play_many(
    players: dict[str, Player],
    user_model,
    tokenizer,
    *,
    n: int,
    turns: int,
    seed: int,
    system_prompt: str,
    settings: Settings,
    context_tokens: int = 1024,
    split: str = "eval",
    answer_last: bool = True,
    safety: SafetyFilter | None = None,
    progress: Callable[[int], None] | None = None,
    paired: bool = False,
) -> dict[str, list[SelfPlay]]:
    """:func:`self_play` of several bots on the same openers and personas, in lock-step:
    each round every bot replies in its own conversations, then the simulated users of
    all of them answer in one batched generation (one model plays every user: a batch
    of 64 rows costs about what 32 cost a step on 2 CPU cores, so comparing 6 models
    answers their users in ~half the time). Each bot samples from its own random stream,
    seeded alike (its first turn draws exactly what a :func:`self_play` of it alone
    draws: common random numbers between the models compared); the users' draws
    continue the last bot's stream (for one bot, exactly :func:`self_play`).
    ``paired``: every draw keyed by (seed, conversation, turn, token) instead (module
    doc): the streams then play no part. ``progress(1)`` after each bot's round of
    replies."""
    openers = held_out_openers(n, seed, split)
    games: dict[str, list[SelfPlay]] = {}
    for name in players:
        rng = random.Random(seed)
        games[name] = [
            SelfPlay(opener, rng.choice(PERSONAS), key=row_key(seed, i) if paired else None)
            for i, opener in enumerate(openers)
        ]
        for game in games[name]:
            game.turns.append(Turn("user", game.opener))
    torch.manual_seed(seed)
    streams = dict.fromkeys(players, _rng_state())
    reported = 0
    for turn in range(turns):
        live = {name: [g for g in games[name] if not g.ended_by_user] for name in players}
        if not any(live.values()):
            break
        for name, player in players.items():
            if not live[name]:
                continue
            _set_rng_state(streams[name])
            round_args = (tokenizer, system_prompt, settings, context_tokens, safety)
            _bot_round(player, live[name], *round_args)
            streams[name] = _rng_state()
            if progress:
                progress(1)
                reported += 1
        if turn == turns - 1 and not answer_last:
            break
        everyone = [g for name in players for g in live[name]]
        _user_round(everyone, user_model, tokenizer, settings, context_tokens)
        streams[list(players)[-1]] = _rng_state()
    if progress and reported < turns * len(players):  # conversations ended early
        progress(turns * len(players) - reported)
    return games


def _rng_state():
    """The state of every torch generator sampling may draw from (CPU, and CUDA's)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def turn_keys(games: list[SelfPlay]) -> list[int] | None:
    """The keys of each game's next turn (paired play), or None (unpaired)."""
    if any(g.key is None for g in games):
        return None
    return [row_key(g.key, len(g.turns)) for g in games]


def _bot_round(player: Player, live, tokenizer, system_prompt, settings, context_tokens, safety):
    """Every live game's next bot turn (best-of-N if the player plays it; checked by
    ``safety`` as a chat checks its replies, if given)."""
    prompts = [build_prompt(tokenizer, system_prompt, g.turns, context_tokens) for g in live]
    cut: list[bool] = []
    model, rerank, keys = player.model, player.rerank, turn_keys(live)
    if rerank:
        replies, cut = best_of_batch(model, tokenizer, prompts, settings, rerank, live, keys)
    else:
        replies = generate_batch(model, tokenizer, prompts, settings, cut, keys=keys)
    if safety is not None:
        check_replies(live, replies, cut, prompts, safety, model, tokenizer, settings, keys)
    for game, reply, was_cut in zip(live, replies, cut, strict=True):
        if was_cut:
            game.cut.add(len(game.turns))
        game.turns.append(Turn("bot", reply))


def _user_round(live, user_model, tokenizer, settings, context_tokens) -> None:
    """Every live game's simulated user answers (one batched generation); a goodbye or
    an empty line ends the game."""
    # the simulated user sees the conversation from its side: roles swapped
    user_prompts = [
        build_prompt(
            tokenizer,
            USER_SYSTEM.format(persona=g.persona),
            [Turn("user" if t.role == "bot" else "bot", t.text) for t in g.turns],
            context_tokens,
        )
        for g in live
    ]
    user_settings = replace(settings, max_new_tokens=min(settings.max_new_tokens, USER_MAX_TOKENS))
    said_all = generate_batch(
        user_model, tokenizer, user_prompts, user_settings, keys=turn_keys(live)
    )
    for game, said in zip(live, said_all, strict=True):
        game.turns.append(Turn("user", said))
        if said == "…" or any(word in said.lower() for word in GOODBYES):
            game.ended_by_user = True


def check_replies(
    games: list[SelfPlay],
    replies: list[str],
    cut: list[bool],
    prompts: list[list[int]],
    safety: SafetyFilter,
    model,
    tokenizer,
    settings: Settings,
    keys: list[int] | None = None,
) -> None:
    """The safety filter on one round of bot replies, in place: the flagged ones are
    regenerated together, once; those flagged again become the fallback line. Each
    flagged reply is recorded on its game (``withdrawn``) for the next bot turn. With
    ``keys`` (paired play) the regenerated replies are keyed too (a second draw)."""
    pending = list(range(len(replies)))
    for attempt in range(2):
        scores = safety.scores([replies[i] for i in pending])
        flagged = [i for i, s in zip(pending, scores, strict=True) if safety.flagged(s)]
        for i, score in zip(pending, scores, strict=True):
            if safety.flagged(score):
                record = {"text": replies[i], "unsafe": safety.flag_record(score)}
                record |= {"cut": True} if cut[i] else {}
                games[i].withdrawn.setdefault(len(games[i].turns), []).append(record)
        if not flagged:
            return
        if attempt == 0:
            again: list[bool] = []
            flagged_prompts = [prompts[i] for i in flagged]
            redrawn = None if keys is None else [row_key(keys[i], -1) for i in flagged]
            redone = generate_batch(
                model, tokenizer, flagged_prompts, settings, again, keys=redrawn
            )
            for i, text, was_cut in zip(flagged, redone, again, strict=True):
                replies[i], cut[i] = text, was_cut
        pending = flagged
    for i in pending:
        replies[i], cut[i] = safety.fallback, False
        games[i].fallback.add(len(games[i].turns))


def simulate_into_store(
    store,
    policy_model,
    user_model,
    tokenizer,
    *,
    version: str,
    n: int,
    turns: int,
    seed: int,
    batch: int,
    system_prompt: str,
    settings: Settings,
    progress=None,
    safety: SafetyFilter | None = None,
) -> int:
    """``rapport simulate``: self-play on the training openers, logged as platform
    "simulated" batch by batch, each bot turn with the version that wrote it, its
    generation settings and ``cut`` when the length limit ended it (as a chat logs
    it). A kill loses at most the batch in flight; a re-run with the same arguments
    skips the batches already stored. ``safety``: the chat's reply filter, applied and
    logged as a chat does (module doc). Returns how many conversations were added."""
    added = 0
    for start in range(0, n, batch):
        size = min(batch, n - start)
        ids = [f"{version}:{seed}:{i}" for i in range(start, start + size)]
        if not all(store.has_imported("simulated", i) for i in ids):
            games = self_play(
                policy_model,
                user_model,
                tokenizer,
                n=size,
                turns=turns,
                seed=seed * 1_000_003 + start,
                system_prompt=system_prompt,
                settings=settings,
                split="train",
                safety=safety,
                paired=True,  # keyed draws: the logs of a seed whatever the decoder (doc)
            )
            added += store.import_conversations(
                "simulated",
                [_imported(i, g, version, settings) for i, g in zip(ids, games, strict=True)],
            )
        if progress:
            progress(size)
    return added


def _imported(external_id: str, game: SelfPlay, version: str, settings: Settings):
    """One game as a logged conversation; the replies the safety filter withdrew come
    before the bot turn that replaced them, each marked replaced by the next turn."""
    turns, generations, replaced = [], [], []
    for k, t in enumerate(game.turns):
        for record in game.withdrawn.get(k, []):
            turns.append(("bot", "model", record["text"]))
            generations.append(settings.as_dict() | {x: record[x] for x in record if x != "text"})
            replaced.append(True)
        turns.append((t.role, "model", t.text))
        generation = None
        if t.role == "bot":
            generation = settings.as_dict() | ({"cut": True} if k in game.cut else {})
            generation |= {"fallback": True} if k in game.fallback else {}
        generations.append(generation)
        replaced.append(False)
    return Imported(
        external_id,
        f"simulated:{game.persona}",
        tuple(turns),
        model_version=version,
        generations=tuple(generations),
        replaced=tuple(replaced),
    )
