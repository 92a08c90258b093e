"""word_similarity: does the bot stay on the user's topic?

Scores: the bot turn against the user turns around it. Formula: the mean, over the user
turn the bot answers and the user's reply (those that exist), of the Jaccard overlap of
content words (stop words removed): |B ∩ U| / |B ∪ U|, in [0, 1]. Jaques et al. 2019
("word similarity"). 0 when there is no user turn, or no content words.

>>> from rewards.context import Context
>>> word_similarity([Context("Cats are great pets", prev_user="I love my cats")])
[0.25]
"""

from __future__ import annotations

from rewards.context import Context
from rewards.text import content_words


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def word_similarity(contexts: list[Context]) -> list[float]:
    values = []
    for c in contexts:
        bot = content_words(c.bot)
        others = [u for u in (c.prev_user, c.next_user) if u is not None]
        values.append(
            sum(jaccard(bot, content_words(u)) for u in others) / len(others) if others else 0.0
        )
    return values
