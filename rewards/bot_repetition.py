"""bot_repetition: a penalty for repeating n-grams.

Scores: the bot turn. Formula: −(within + across) / 2, in [-1, 0], where for word
n-grams with n = 1..3 (unigrams without stop words) ``within`` is the share of the turn's
n-grams that repeat an earlier n-gram of the same turn, and ``across`` the share that
already appeared in the bot's earlier turns of the conversation, each averaged over n.
Jaques et al. 2019 penalise repetition ("repetition" reward) with word overlap; counting
n-grams inside the turn too catches the loops small models fall into.

>>> import functools

from rewards.context import Context
>>> bot_repetition([Context("I like cats. I like cats. I like cats.")])[0] < -0.3
True
>>> bot_repetition([Context("Sure, tell me more about your trip!")])
[0.0]
"""

from __future__ import annotations

import functools

from rewards.context import Context
from rewards.text import STOP_WORDS, words

ORDERS = (1, 2, 3)


def ngrams(tokens: list[str], n: int) -> list[tuple[str, ...]]:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if n == 1:
        grams = [g for g in grams if g[0] not in STOP_WORDS]
    return grams


@functools.lru_cache(maxsize=65536)
def ngram_set(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """Cached: a bot turn is an earlier turn of every later turn in its conversation."""
    return frozenset(ngrams(words(text), n))


def repetition(text: str, earlier: tuple[str, ...]) -> float:
    tokens = words(text)
    within, across, counted = 0.0, 0.0, 0
    for n in ORDERS:
        grams = ngrams(tokens, n)
        if not grams:
            continue
        counted += 1
        within += 1 - len(set(grams)) / len(grams)
        before = frozenset().union(*(ngram_set(t, n) for t in earlier))
        across += sum(g in before for g in grams) / len(grams)
    return (within + across) / (2 * counted) if counted else 0.0


def bot_repetition(contexts: list[Context]) -> list[float]:
    return [-r if (r := repetition(c.bot, c.earlier_bot)) else 0.0 for c in contexts]
