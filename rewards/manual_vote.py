"""manual_vote: the explicit 👍/👎 votes on the bot turn.

Scores: the bot turn's votes. Formula: the mean of its votes (+1/-1), 0 with no votes.
The explicit signal the implicit ones are compared against (Jaques et al. 2019 collect
them as "manual votes").

>>> from rewards.context import Context
>>> manual_vote([Context("x", votes=(1, 1, -1)), Context("x")])
[0.3333333333333333, 0.0]
"""

from __future__ import annotations

from rewards.context import Context


def manual_vote(contexts: list[Context]) -> list[float]:
    return [sum(c.votes) / len(c.votes) if c.votes else 0.0 for c in contexts]
