"""``rapport eval``: compare model versions on the same simulated users (the paper's tables).

Every model plays the same seeded self-play conversations (same openers, personas and
seeds), all in lock-step: each round every model replies, then one batched generation
answers all their simulated users (:func:`learner.simulate.self_play_many`). Sampling is
paired: each token's draw is keyed by (seed, conversation, turn, token), so where two
models' next-token distributions agree they draw the same token, and their users answer
the same words alike (common random numbers; :func:`bot.policy.keyed_gumbel`). A
difference between two rows is then the models', not two independent draws' (the
prior's perplexity over 200 openers moved 6.59 -> 5.94 between two runs that differed
only in its random draws, psi's ratio to it 1.17 -> 1.30). Per model, over its bot
turns:

- elicited reward: every implicit signal, and the combined reward with statistics fitted
  on the pooled self-play of all the models compared (so the numbers are comparable);
- fluency: perplexity of each reply under the prior given the system prompt and the user
  turn it answers. Not the whole conversation: a policy stuck on one reply makes its own
  repeats likely (a language model copies what the context already says: a repeated
  question's perplexity falls from ~20 to ~2 by its fourth time), so whole-conversation
  perplexity would rate the collapse as fluent. Given the user's turn alone, a reply
  must fit what it answers;
- diversity: distinct-1 and distinct-2 over all its replies, and the share of replies
  that repeat another reply;
- relatedness (embedding similarity), question rate, repetition;
- KL(π‖prior) per token along every one of its replies, in the full conversation the
  policy acted in (one forward per conversation and model, reading every bot token);
- reply length in words, and conversation length (bot turns before the user left);
- with a ``reference`` model, each model's perplexity over the reference's, and each
  reward column minus the reference's, paired by conversation (:func:`paired_ratio`,
  :func:`paired_difference`).

Each number comes with a 95% interval over conversations: a percentile bootstrap
(seeded) for the columns that average over replies, and a jackknife (leave one
conversation out) for the columns that count *distinct* things (distinct-n, repeated
replies). Resampling conversations with replacement duplicates their replies, so every
bootstrap resample looks less diverse than the sample itself (distinct-2 0.83 fell
outside its own interval [0.45, 0.69]); leaving one out never duplicates anything. Every
column is read from the same resamples (:func:`intervals`). The model forwards are
batched across conversations (:mod:`learner.evaluate`), and callers pass the prior in
the precision the policies are served in (:func:`bot.policy.batch_precision`: bf16 where
the CPU computes it natively, several times faster than fp32 there; else fp32), so a
policy that is the prior has KL exactly 0 rather than the rounding difference between
two precisions.
"""

from __future__ import annotations

import json
import math
import random
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from bot.prompt import Turn, build_prompt
from learner.data import turn_spans
from learner.evaluate import (
    distinct_n,
    kl_per_tokens,
    perplexities,
    perplexity_from,
    reply_positions,
)
from learner.simulate import Player, SelfPlay, first_candidates, self_play_many
from rewards.combine import combine, fit_stats
from rewards.score import contexts_of
from rewards.suite import SIGNAL_NAMES, score_contexts
from rewards.text import words

COLUMNS = (
    "combined",
    *SIGNAL_NAMES,
    "perplexity",
    "distinct_1",
    "distinct_2",
    "repeated_replies",
    "kl_to_prior",
    "reply_words",
    "conversation_turns",
)


def game_rows(game: SelfPlay) -> list[dict]:
    return [
        {"id": i, "role": t.role, "author": "model", "text": t.text, "votes": ()}
        for i, t in enumerate(game.turns)
    ]


def signals_per_game(games: list[SelfPlay]) -> list[dict[str, list[float]]]:
    """Every reward signal of every bot turn, grouped by conversation."""
    pairs = [contexts_of(game_rows(g)) for g in games]
    flat = [c for p in pairs for _, c in p]
    values = score_contexts(flat) if flat else {n: [] for n in SIGNAL_NAMES}
    out, start = [], 0
    for p in pairs:
        out.append({n: values[n][start : start + len(p)] for n in SIGNAL_NAMES})
        start += len(p)
    return out


def bootstrap(
    items: Sequence, statistic: Callable[[Sequence], float], seed: int, resamples: int = 1000
) -> tuple[float, float]:
    """95% percentile interval of ``statistic`` over resamples of ``items``."""
    return _percentiles([statistic(sample) for sample in _resamples(items, seed, resamples)])


def _resamples(items: Sequence, seed: int, resamples: int):
    """``resamples`` seeded resamples of ``items`` with replacement, each as long."""
    rng = random.Random(seed)
    for _ in range(resamples):
        yield [items[rng.randrange(len(items))] for _ in items]


def paired_ratio(
    ours: Sequence[list[float]], theirs: Sequence[list[float]], seed: int, resamples: int = 1000
) -> dict:
    """{"value", "low", "high"}: the ratio of two models' pooled mean of a per-reply
    measure (e.g. perplexity) on the same conversations (index i: the same opener and
    persona), with a 95% percentile interval from resampling conversation indices for
    both at once. Pairing removes what the openers share (a hard opener makes every
    model's reply less fluent), which two intervals side by side count twice."""

    def ratio(mine: float, reference: float) -> float:
        return mine / reference if reference else float("nan")

    return _paired(ours, theirs, seed, resamples, ratio)


def paired_difference(
    ours: Sequence[list[float]], theirs: Sequence[list[float]], seed: int, resamples: int = 1000
) -> dict:
    """{"value", "low", "high"}: our pooled mean of a per-reply measure (e.g. the
    targeted reward) minus theirs, on the same conversations, resampled as in
    :func:`paired_ratio`. With paired sampling (:mod:`learner.simulate`) the two rows'
    replies share their draws, so this interval is the one that says whether a model
    moved the measure: two rows' intervals side by side count the draws' noise twice."""
    return _paired(ours, theirs, seed, resamples, lambda mine, reference: mine - reference)


def _paired(ours, theirs, seed: int, resamples: int, combine) -> dict:
    """``combine`` (our pooled mean, theirs) on the conversations, and its 95% percentile
    interval over resamples of conversation indices taken for both at once."""
    if len(ours) != len(theirs):
        raise ValueError("a paired comparison needs the same conversations on both sides")
    # each conversation's (sum, count) of finite values: a pooled mean of a resample is
    # then two sums (what _mean of its values gives, 0 where there are none)
    reduced = [
        [(sum(f), len(f)) for f in ([x for x in xs if math.isfinite(x)] for xs in side)]
        for side in (ours, theirs)
    ]

    def pooled(side, picked: Sequence[int]) -> float:
        count = sum(side[i][1] for i in picked)
        return sum(side[i][0] for i in picked) / count if count else 0.0

    def statistic(picked: Sequence[int]) -> float:
        return combine(pooled(reduced[0], picked), pooled(reduced[1], picked))

    indices = list(range(len(ours)))
    low, high = _percentiles([statistic(r) for r in _resamples(indices, seed, resamples)])
    return {"value": statistic(indices), "low": low, "high": high}


def _percentiles(values: list[float]) -> tuple[float, float]:
    values = sorted(values)
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


# Columns that count distinct replies or n-grams: a resample with duplicates biases them.
SET_COLUMNS = ("distinct_1", "distinct_2", "repeated_replies")


def jackknife(items: Sequence, statistic: Callable[[Sequence], float]) -> tuple[float, float]:
    """95% normal interval of ``statistic`` from its leave-one-out values: the point
    ± 1.96 jackknife standard errors (it always holds the point)."""
    loo = [statistic([x for j, x in enumerate(items) if j != i]) for i in range(len(items))]
    return _jackknife_interval(statistic(items), loo)


def _jackknife_interval(point: float, loo: list[float]) -> tuple[float, float]:
    n = len(loo)
    if n < 2:
        return point, point
    mean = sum(loo) / n
    se = math.sqrt((n - 1) / n * sum((v - mean) ** 2 for v in loo))
    return point - 1.96 * se, point + 1.96 * se


def intervals(measures: Sequence[dict], seed: int, resamples: int = 200) -> dict:
    """{column: {"value", "low", "high"}} for a set of conversations' measures.

    Every column is read from the same resamples (one :func:`columns_of` per resample,
    not one per column and resample: the same intervals as bootstrapping each column on
    its own with ``seed``, ~20x fewer passes), and the replies are split into words once.
    """
    measures = [{**m, "words": [words(r) for r in m["replies"]]} for m in measures]
    values = columns_of(measures)
    boot = [columns_of(sample) for sample in _resamples(measures, seed, resamples)]
    n = len(measures)
    loo = [columns_of(measures[:i] + measures[i + 1 :]) for i in range(n)] if n > 1 else []
    table = {}
    for column in COLUMNS:
        if column in SET_COLUMNS:
            low, high = _jackknife_interval(values[column], [v[column] for v in loo])
        else:
            low, high = _percentiles([v[column] for v in boot])
        table[column] = {"value": values[column], "low": low, "high": high}
    return table


def _mean(xs) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else 0.0


def fluency_inputs(games, tokenizer, system_prompt) -> list[tuple[list[int], list[int]]]:
    """(ids, scored positions) of every bot reply given only the user turn it answers."""
    out = []
    for game in games:
        for k, turn in enumerate(game.turns):
            if turn.role == "bot":
                prompt = build_prompt(tokenizer, system_prompt, [game.turns[k - 1]], 1024)
                reply = tokenizer(turn.text, add_special_tokens=False)["input_ids"]
                out.append((prompt + reply, reply_positions(prompt, reply)))
    return out


def fluency(games, tokenizer, system_prompt, prior, kl_seqs, taken) -> list[float]:
    """The perplexity of every bot reply given the user turn it answers (in
    :func:`fluency_inputs` order). A reply whose fluency input is the start of its
    conversation's KL input (every first bot turn: system prompt, opener, reply) is read
    from the prior's log-probabilities the KL forward already took (``taken``, one dict
    per game, empty where none was taken); only the others get a forward of their own.
    For one-turn evaluations this is one forward of the prior a model, not two."""
    inputs = fluency_inputs(games, tokenizer, system_prompt)
    owner = [g for g, game in enumerate(games) for t in game.turns if t.role == "bot"]
    out = [float("nan")] * len(inputs)
    rest = []
    for k, ((ids, pos), g) in enumerate(zip(inputs, owner, strict=True)):
        seen = taken[g]
        if kl_seqs[g][: len(ids)] == ids and all(t in seen for t in pos):
            out[k] = perplexity_from(seen, pos)
        else:
            rest.append(k)
    if rest:
        forwarded = perplexities(prior, [inputs[k][0] for k in rest], [inputs[k][1] for k in rest])
        for k, value in zip(rest, forwarded, strict=True):
            out[k] = value
    return out


def kl_inputs(games, tokenizer, system_prompt) -> list[tuple[list[int], list[int]]]:
    """(ids, positions predicting the bot's tokens) of each conversation up to its last
    bot turn, as the policy saw it."""
    out = []
    for game in games:
        last = max((k for k, t in enumerate(game.turns) if t.role == "bot"), default=-1)
        turns = [Turn(t.role, t.text) for t in game.turns[: last + 1]]
        ids, spans = turn_spans(tokenizer, system_prompt, turns, next_bot=False)
        out.append((ids, [p for s, e in spans.values() for p in range(s - 1, e - 1)]))
    return out


def measures_of(
    games, signals, stats, weights, prior, policy, tokenizer, system_prompt, rerank=None
):
    """The per-conversation quantities every column is computed from. For a model
    played best-of-N (``rerank``) the KL column is its bound per reply (see
    :meth:`learner.simulate.Rerank.kl_bound`) spread over the reply tokens."""
    kl_seqs, kl_pos = zip(*kl_inputs(games, tokenizer, system_prompt), strict=True)
    taken: list[dict[int, float]] = [{} for _ in games]
    if rerank:
        kls = [
            rerank.kl_bound() * len(g.bot_turns) / max(len(pos), 1)
            for g, pos in zip(games, kl_pos, strict=True)
        ]
    elif policy is prior:  # the prior's own row is 0 by definition: two forwards saved
        kls = [0.0] * len(games)
    else:
        taken = []
        kls = kl_per_tokens(policy, prior, kl_seqs, kl_pos, taken)
    ppl = iter(fluency(games, tokenizer, system_prompt, prior, kl_seqs, taken))
    measures = []
    for game, sig, kl in zip(games, signals, kls, strict=True):
        replies = game.bot_turns
        measures.append(
            {
                "replies": replies,
                "signals": sig,
                "combined": [
                    combine({n: sig[n][i] for n in SIGNAL_NAMES}, stats, weights)
                    for i in range(len(replies))
                ],
                "perplexity": [p for p in (next(ppl) for _ in replies) if math.isfinite(p)],
                "kl_to_prior": kl,
                "conversation_turns": len(replies),
            }
        )
    return measures


def columns_of(measures: Sequence[dict]) -> dict[str, float]:
    """Every column for a set of conversations (used for the value and its bootstrap)."""
    replies = [r for m in measures for r in m["replies"]]
    tokens = [t for m in measures for t in (m.get("words") or map(words, m["replies"]))]
    out = {"combined": _mean([c for m in measures for c in m["combined"]])}
    for name in SIGNAL_NAMES:
        out[name] = _mean([v for m in measures for v in m["signals"][name]])
    out["perplexity"] = _mean([p for m in measures for p in m["perplexity"]])
    out["distinct_1"] = distinct_n(tokens, 1)
    out["distinct_2"] = distinct_n(tokens, 2)
    out["repeated_replies"] = 1 - len(set(replies)) / len(replies) if replies else 0.0
    out["kl_to_prior"] = _mean([m["kl_to_prior"] for m in measures])
    out["reply_words"] = _mean([len(t) for t in tokens])
    out["conversation_turns"] = _mean([m["conversation_turns"] for m in measures])
    return out


def evaluate(
    models: dict[str, tuple],
    prior,
    user_model,
    tokenizer,
    *,
    n: int,
    turns: int,
    seed: int,
    system_prompt: str,
    settings,
    weights: dict[str, float],
    progress: Callable[[int], None] | None = None,
    answer_last: bool = True,
    rerank: dict | None = None,
    reference: str | None = None,
    versus: dict[str, str] | None = None,
) -> dict:
    """{model name: {column: {"value", "low", "high"}}, "samples": ...} for every model.

    ``models`` maps a name to its (model, tokenizer) as served. The models play in
    lock-step (:func:`learner.simulate.self_play_many`: their simulated users answer in
    one batch). ``progress(1)`` is called after each model's round of bot turns and each
    model's scoring: :func:`progress_units` in all.
    ``answer_last=False``: the simulated users do not answer the last bot turn (see
    :func:`learner.simulate.self_play`; the signals that read the reply then read none).
    ``rerank`` maps a model name to the :class:`learner.simulate.Rerank` it is played
    with (best-of-N, e.g. "prior + best-of-4" beside trained versions). With a
    ``reference`` model (e.g. the prior), every row also gets ``perplexity_ratio``: its
    perplexity over the reference's, and ``difference``: {reward column: its value minus
    the reference's}, paired by conversation (:func:`paired_ratio`,
    :func:`paired_difference`). ``versus`` maps a row to another row it is compared with
    head to head (e.g. two learners stopped at the same KL from the prior): the row gets
    ``versus``: {"row": the other, "difference": {reward column: its value minus the
    other's, paired by conversation}}, one interval where two rows' intervals side by side
    would overlap for a real difference.
    """
    rerank = rerank or {}
    # One-reply games (unanswered) of a model that also plays best-of-N read their reply
    # from its best-of-N games' first candidates: paired, the first candidate is keyed
    # as the plain reply, so these are exactly the replies it would play on its own,
    # sampled once (in the learning bench, the prior's 200 replies are 1.6 of its 85
    # minutes).
    twins = {}  # plain row -> its best-of-N row
    if turns == 1 and not answer_last:
        for name in rerank:
            for plain, (model, _) in models.items():
                if plain not in rerank and plain not in twins and model is models[name][0]:
                    twins[plain] = name
                    break
    games = self_play_many(
        {name: Player(models[name][0], rerank.get(name)) for name in models if name not in twins},
        user_model,
        tokenizer,
        n=n,
        turns=turns,
        seed=seed,
        system_prompt=system_prompt,
        settings=settings,
        answer_last=answer_last,
        progress=progress,
        paired=True,  # common random numbers: the rows differ by their models alone
    )
    for plain, name in twins.items():
        games[plain] = first_candidates(games[name])
        if progress:
            progress(turns)
    games = {name: games[name] for name in models}
    signals = {name: signals_per_game(g) for name, g in games.items()}
    pooled = {
        s: [v for per in signals.values() for game in per for v in game[s]] for s in SIGNAL_NAMES
    }
    stats = fit_stats(pooled)
    results: dict = {"samples": {}}
    perplexities, rewards = {}, {}
    for name, (model, _) in models.items():
        measures = measures_of(
            games[name],
            signals[name],
            stats,
            weights,
            prior,
            model,
            tokenizer,
            system_prompt,
            rerank.get(name),
        )
        results[name] = intervals(measures, seed)
        perplexities[name] = [m["perplexity"] for m in measures]
        rewards[name] = {"combined": [m["combined"] for m in measures]} | {
            s: [m["signals"][s] for m in measures] for s in SIGNAL_NAMES
        }
        if progress:
            progress(1)
        results["samples"][name] = [[asdict(t) for t in g.turns] for g in games[name][:3]]
    if reference in perplexities:
        for name, per in perplexities.items():
            ratio = paired_ratio(per, perplexities[reference], seed)
            results[name]["perplexity_ratio"] = ratio
            results[name]["difference"] = {
                column: paired_difference(values, rewards[reference][column], seed)
                for column, values in rewards[name].items()
            }
    for name, other in (versus or {}).items():
        if name in rewards and other in rewards and other != name:
            results[name]["versus"] = {
                "row": other,
                "difference": {
                    column: paired_difference(values, rewards[other][column], seed)
                    for column, values in rewards[name].items()
                },
            }
    return results


def progress_units(models: int, turns: int) -> int:
    """How many ``progress(1)`` calls :func:`evaluate` makes for ``models`` models."""
    return models * (turns + 1)


def compare(
    models: dict[str, tuple],
    user_model,
    tokenizer,
    *,
    n: int,
    seed: int,
    system_prompt: str,
    settings,
    weights: dict[str, float],
) -> list[dict]:
    """What each model says to the same ``n`` held-out openers (seeded), and what the
    simulated user answered: [{"opener", "replies": {name: {"text", "answer", "combined",
    signal: value, ...}}}]. The combined reward is z-scored over every reply here."""
    games = self_play_many(
        {name: Player(model) for name, (model, _) in models.items()},
        user_model,
        tokenizer,
        n=n,
        turns=1,
        seed=seed,
        system_prompt=system_prompt,
        settings=settings,
    )
    signals = {name: signals_per_game(g) for name, g in games.items()}
    pooled = {s: [v for per in signals.values() for g in per for v in g[s]] for s in SIGNAL_NAMES}
    stats = fit_stats(pooled)
    rows = []
    for k in range(n):
        replies = {}
        for name, played in games.items():
            game, values = played[k], {s: v[0] for s, v in signals[name][k].items() if v}
            turns = game.turns
            replies[name] = {
                "text": turns[1].text if len(turns) > 1 else "",
                "answer": turns[2].text if len(turns) > 2 else "",
                "combined": combine(values, stats, weights),
                **values,
            }
        rows.append({"opener": next(iter(games.values()))[k].opener, "replies": replies})
    return rows


def format_table(results: dict, columns: Sequence[str] = COLUMNS, width: int = 0) -> str:
    """One line per measure and one column per model, each cell "value [low, high]",
    in blocks of models that fit ``width`` (default: the terminal's). A model whose name
    is longer than a cell (a folder) is headed m1, m2, ... with a legend below."""
    width = width or shutil.get_terminal_size((80, 24)).columns
    names = [k for k in results if k != "samples" and isinstance(results[k], dict)]
    cells = {
        name: [
            f"{results[name][c]['value']:.3f} [{results[name][c]['low']:.2f}, "
            f"{results[name][c]['high']:.2f}]"
            for c in columns
        ]
        for name in names
    }
    cell = max(len(x) for row in cells.values() for x in row)
    label = max(len(c) for c in (*columns, "model"))
    heads = [f"m{i + 1}" if len(n) > cell else n for i, n in enumerate(names)]
    per_block = max(1, (width - label) // (cell + 2))
    blocks = []
    for start in range(0, len(names), per_block):
        picked = range(start, min(start + per_block, len(names)))
        lines = [f"{'model':<{label}}" + "".join(f"  {heads[i]:>{cell}}" for i in picked)]
        for k, column in enumerate(columns):
            lines.append(
                f"{column:<{label}}" + "".join(f"  {cells[names[i]][k]:>{cell}}" for i in picked)
            )
        blocks.append("\n".join(lines))
    legend = [f"{head}: {name}" for head, name in zip(heads, names, strict=True) if head != name]
    return "\n\n".join(blocks) + ("\n" + "\n".join(legend) if legend else "")


def write_json(results: dict, path) -> None:
    """The results as JSON, written whole then renamed over ``path``."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    tmp.replace(path)
