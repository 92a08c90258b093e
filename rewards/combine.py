"""Normalise each signal and combine them into one reward with configured weights.

Each signal is z-scored with statistics of the scored logs: z = (x − mean) / std, then
clipped to ±``Z_CLIP``. A signal that is constant over the logs (std ≈ 0) carries no
information and gets z = 0, never a division by zero. The clip is for sparse signals:
an event at base rate p sits at sqrt((1 − p)/p) standard deviations, so one 👍 among
15,000 turns would be +122 and laughter at 2% +7, and one event would outweigh every
other signal of the combined reward; clipped, it counts at most as much as any signal's
strong reading. The combined reward is Σ_signal weight · z; the weights come from the
``[rewards]`` config section. Normalisation lives here, never inside a reward.

>>> stats = fit_stats({"a": [0.0, 2.0], "b": [5.0, 5.0]})
>>> stats["a"], stats["b"]
((1.0, 1.0, 2), (5.0, 0.0, 2))
>>> combine({"a": 2.0, "b": 5.0}, stats, {"a": 0.5, "b": 3.0})
0.5
>>> rare = fit_stats({"vote": [1.0] + [0.0] * 9999})
>>> z_score(1.0, rare["vote"])
3.0
"""

from __future__ import annotations

import math

# Below this standard deviation a signal is treated as constant.
MIN_STD = 1e-8
# No signal's z-score counts beyond this, however rare the event (module doc).
Z_CLIP = 3.0


def fit_stats(values: dict[str, list[float]]) -> dict[str, tuple[float, float, int]]:
    """{signal: (mean, population std, count)} of each signal's values."""
    stats = {}
    for name, xs in values.items():
        n = len(xs)
        mean = math.fsum(xs) / n if n else 0.0
        var = math.fsum((x - mean) ** 2 for x in xs) / n if n else 0.0
        stats[name] = (mean, math.sqrt(var), n)
    return stats


def z_score(value: float, stats: tuple[float, float, int]) -> float:
    mean, std, _ = stats
    if std <= MIN_STD:
        return 0.0
    return max(-Z_CLIP, min(Z_CLIP, (value - mean) / std))


def combine(
    raw: dict[str, float],
    stats: dict[str, tuple[float, float, int]],
    weights: dict[str, float],
) -> float:
    """Σ weight · z over the weighted signals present in ``raw`` (missing ones count 0)."""
    return math.fsum(
        weight * z_score(raw[name], stats[name])
        for name, weight in weights.items()
        if weight and name in raw and name in stats
    )
