"""Best-of-N's ranking: the learned reward of candidate replies, and the choice.

The cheapest way a deployed bot improves from feedback before any retraining (Chai 2023
sampled several replies and sent the one a reward model ranked highest). The ranking
model is the vote ensemble of :mod:`rewards.learned_reward`; each candidate is scored as
that model scores a logged bot turn (the user turn it answers and the reply, rendered
with the safe chat template: text a user typed as a control token stays text).

The choice is pessimistic: mean − caution × spread across the ensemble's members, so a
reply the members disagree on is not chosen for one member's lucky high score. An empty
candidate (a reply that was only template debris) is never chosen.
"""

from __future__ import annotations

import math
from pathlib import Path

from rewards.learned_reward import INFO_FILE, RewardEnsemble, latest_reward_model, reward_messages


class RewardRanker:
    """(user turn, candidates) -> [(mean, spread)] of the reward ensemble in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.ensemble = RewardEnsemble(folder)

    @property
    def version(self) -> str:
        return self.ensemble.version

    def __call__(self, user: str, replies: list[str]) -> list[tuple[float, float]]:
        mean, spread = self.ensemble.score([reward_messages(user, r) for r in replies])
        return list(zip(mean, spread, strict=True))

    @classmethod
    def latest(cls, folder: Path) -> RewardRanker | None:
        """The newest trained reward model under ``folder``, or None when there is none."""
        found = latest_reward_model(folder) if Path(folder).is_dir() else None
        return cls(found) if found and (found / INFO_FILE).exists() else None


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
