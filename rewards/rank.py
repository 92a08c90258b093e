"""Best-of-N's ranking: the learned reward of candidate replies, and the choice.

The cheapest way a deployed bot improves from feedback before any retraining (Chai 2023
sampled several replies and sent the one a reward model ranked highest). The ranking
models are the vote ensemble of :mod:`rewards.learned_reward` and, when one is trained,
the engagement ensemble (whether the user continued); each candidate is scored as
those models score a logged bot turn (the user turn it answers and the reply, rendered
with the safe chat template: text a user typed as a control token stays text).

The members rank in bf16 where the CPU computes it natively (a person waits for the
ranking; :func:`rewards.learned_reward.ranking_dtype`), and score the logs in fp32.

The choice is pessimistic: mean − caution × spread across the ensemble's members, so a
reply the members disagree on is not chosen for one member's lucky high score. An empty
candidate (a reply that was only template debris) is never chosen.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rewards.learned_reward import (
    TARGETS,
    RewardEnsemble,
    latest_reward_model,
    ranking_dtype,
    reward_messages,
)


class RewardRanker:
    """(user turn, candidates) -> [(mean, spread)] of the reward ensembles in
    ``folders``: with a vote model and an engagement model both, the mean of their
    (z-scored) means and the root mean square of their spreads."""

    def __init__(self, *folders: Path, dtype: torch.dtype | None = None) -> None:
        """``dtype``: the members' weights (default :func:`ranking_dtype`)."""
        dtype = dtype or ranking_dtype()
        self.ensembles = [RewardEnsemble(folder, dtype=dtype) for folder in folders]

    @property
    def ensemble(self) -> RewardEnsemble:
        return self.ensembles[0]

    @property
    def version(self) -> str:
        return "+".join(e.version for e in self.ensembles)

    def __call__(self, user: str, replies: list[str]) -> list[tuple[float, float]]:
        messages = [reward_messages(user, r) for r in replies]
        scores = [e.score(messages) for e in self.ensembles]
        k = len(scores)
        return [
            (
                sum(mean[i] for mean, _ in scores) / k,
                math.sqrt(sum(spread[i] ** 2 for _, spread in scores) / k),
            )
            for i in range(len(replies))
        ]

    @classmethod
    def latest(cls, folder: Path) -> RewardRanker | None:
        """The newest reward model on votes and the newest on whether users continued,
        whichever exist under ``folder``; None when there is neither."""
        if not Path(folder).is_dir():
            return None
        found = [f for target in TARGETS if (f := latest_reward_model(folder, target))]
        return cls(*found) if found else None


def choose(
    texts: list[str], scores: list[tuple[float, float] | None], caution: float
) -> int | None:
    """The index of the best candidate by mean − caution × spread; None when every
    candidate is empty. ``scores[i]`` is None for a candidate that was not scored.

    >>> choose(["a", "b", ""], [(1.0, 0.9), (0.5, 0.0), None], caution=1.0)
    1
    """
    best, best_score = None, -math.inf
    for i, (text, score) in enumerate(zip(texts, scores, strict=True)):
        if not text.strip() or score is None:
            continue
        value = score[0] - caution * score[1]
        if best is None or value > best_score:
            best, best_score = i, value
    return best


def rank(
    user: str,
    texts: list[str],
    ranker,
    caution: float,
    candidates: list[int] | None = None,
) -> tuple[int | None, list[tuple[float, float] | None]]:
    """Score ``candidates`` (indices into ``texts``; default: every non-empty one) with
    ``ranker`` in one call and :func:`choose` among them: (the chosen index or None,
    each text's score, None where it was not scored)."""
    if candidates is None:
        candidates = [i for i, t in enumerate(texts) if t.strip()]
    scores: list[tuple[float, float] | None] = [None] * len(texts)
    ranked = ranker(user, [texts[i] for i in candidates]) if candidates else []
    for i, score in zip(candidates, ranked, strict=True):
        scores[i] = score
    return choose(texts, scores, caution), scores
