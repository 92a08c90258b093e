"""``rapport eval``: compare model versions on the same simulated users (the paper's tables).

Every model plays the same seeded self-play conversations (same openers, personas and
seeds; see :mod:`learner.simulate`). Per model, over its bot turns:

- elicited reward: every implicit signal, and the combined reward with statistics fitted
  on the pooled self-play of all the models compared (so the numbers are comparable);
- fluency: perplexity of its replies under the prior;
- diversity: distinct-1 and distinct-2 over all its replies, and the share of replies
  that repeat another reply;
- relatedness (embedding similarity), question rate, repetition;
- KL(π‖prior) per token along its first reply to each held-out opener;
- reply length in words, and conversation length (bot turns before the user left).

Each number comes with a 95% bootstrap interval over conversations (seeded).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict

from bot.prompt import build_prompt
from learner.evaluate import distinct_n, kl_per_token, perplexity
from learner.simulate import SelfPlay
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
    rng = random.Random(seed)
    values = sorted(
        statistic([items[rng.randrange(len(items))] for _ in items]) for _ in range(resamples)
    )
    return values[int(0.025 * resamples)], values[int(0.975 * resamples) - 1]


def _mean(xs) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else 0.0


def per_game_measures(game, signals, stats, weights, prior, policy, tokenizer, system_prompt):
    """The per-conversation quantities every column is computed from."""
    replies = game.bot_turns
    prompts = [
        build_prompt(tokenizer, system_prompt, game.turns[: 2 * i + 1], 1024)
        for i in range(len(replies))
    ]
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
    combined = [
        combine({n: signals[n][i] for n in SIGNAL_NAMES}, stats, weights)
        for i in range(len(replies))
    ]
    return {
        "replies": replies,
        "signals": signals,
        "combined": combined,
        "perplexity": [perplexity(prior, p, r) for p, r in zip(prompts, ids, strict=True) if r],
        "kl_to_prior": kl_per_token(policy, prior, prompts[0], ids[0]) if replies else 0.0,
        "conversation_turns": len(replies),
    }


def columns_of(measures: Sequence[dict]) -> dict[str, float]:
    """Every column for a set of conversations (used for the value and its bootstrap)."""
    replies = [r for m in measures for r in m["replies"]]
    tokens = [words(r) for r in replies]
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
) -> dict:
    """{model name: {column: {"value", "low", "high"}}, "samples": ...} for every model.

    ``models`` maps a name to its (model, tokenizer) as served.
    """
    from learner.simulate import self_play

    games = {
        name: self_play(
            model,
            user_model,
            tokenizer,
            n=n,
            turns=turns,
            seed=seed,
            system_prompt=system_prompt,
            settings=settings,
        )
        for name, (model, _) in models.items()
    }
    signals = {name: signals_per_game(g) for name, g in games.items()}
    pooled = {
        s: [v for per in signals.values() for game in per for v in game[s]] for s in SIGNAL_NAMES
    }
    stats = fit_stats(pooled)
    results: dict = {"samples": {}}
    for name, (model, _) in models.items():
        measures = [
            per_game_measures(g, sig, stats, weights, prior, model, tokenizer, system_prompt)
            for g, sig in zip(games[name], signals[name], strict=True)
        ]
        values = columns_of(measures)
        table = {}
        for column in COLUMNS:
            low, high = bootstrap(
                measures, lambda ms, c=column: columns_of(ms)[c], seed, resamples=200
            )
            table[column] = {"value": values[column], "low": low, "high": high}
        results[name] = table
        results["samples"][name] = [[asdict(t) for t in g.turns] for g in games[name][:3]]
    return results


def format_table(results: dict, columns: Sequence[str] = COLUMNS) -> str:
    """Models as rows (like the paper's tables); each cell "value [low, high]"."""
    names = [k for k in results if k != "samples"]
    width = max(len(n) for n in names)
    header = f"{'model':<{width}}  " + "  ".join(f"{c:>24}" for c in columns)
    lines = [header]
    for name in names:
        cells = [
            f"{results[name][c]['value']:.3f} [{results[name][c]['low']:.2f},"
            f"{results[name][c]['high']:.2f}]"
            for c in columns
        ]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{cell:>24}" for cell in cells))
    return "\n".join(lines)


def write_json(results: dict, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
