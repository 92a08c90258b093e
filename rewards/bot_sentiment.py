"""bot_sentiment: how positive the bot turn itself is.

Scores: the bot turn. Formula: VADER compound in [-1, 1]. Jaques et al. 2019 ("bot
sentiment"), a signal the paper found people preferred.

>>> from rewards.context import Context
>>> happy, sad = bot_sentiment([Context("Wonderful news, congrats!"), Context("I hate it.")])
>>> happy > 0 > sad
True
"""

from __future__ import annotations

from rewards.context import Context
from rewards.text import sentiment


def bot_sentiment(contexts: list[Context]) -> list[float]:
    return [sentiment(c.bot) for c in contexts]
