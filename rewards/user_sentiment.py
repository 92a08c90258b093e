"""user_sentiment: how positive the user's reply to the bot turn is.

Scores: the next user turn. Formula: VADER compound score in [-1, 1] (Hutto & Gilbert
2014) of the user's reply. Jaques et al. 2019 ("sentiment", their strongest implicit
signal). No reply (end of conversation): 0, neutral.

>>> from rewards.context import Context
>>> user_sentiment([Context("Want to hear a joke?", next_user="I love that, thank you!")])[0] > 0.5
True
>>> user_sentiment([Context("Hi", next_user=None)])
[0.0]
"""

from __future__ import annotations

from rewards.context import Context
from rewards.text import sentiment


def user_sentiment(contexts: list[Context]) -> list[float]:
    return [sentiment(c.next_user) for c in contexts]
