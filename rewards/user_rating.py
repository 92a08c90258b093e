"""user_rating: how the user rated the whole conversation at its end.

Scores: the conversation's last bot turn (the rating is sparse and conversation-level;
the learner's discounted return carries it back to the turns before). Formula: the mean
of the 1-5 answers to the end-of-chat questions (overall quality, fluency, diversity,
relatedness, empathy: ``/rate``), mapped to [-1, 1] by (mean − 3) / 2; 0 on every other
turn and in conversations nobody rated. Jaques et al. 2019 asked exactly these questions
in their human evaluation (and their web app asked people to rate each chat).

Its weight is 0 by default: ratings are rare, one rating scores a whole conversation
but lands on one turn, and the end of a chat is when people rate on a whim; watch its
agreement with votes and the implicit signals in ``rapport report rewards`` before
giving it weight.

>>> from rewards.context import Context
>>> user_rating([Context("x", rating=(5, 5, 5, 5, 5)), Context("x", rating=(1, 2, 3, 2, 2)),
...              Context("x")])
[1.0, -0.5, 0.0]
"""

from __future__ import annotations

from rewards.context import Context


def user_rating(contexts: list[Context]) -> list[float]:
    return [(sum(c.rating) / len(c.rating) - 3) / 2 if c.rating else 0.0 for c in contexts]
