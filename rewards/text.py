"""Shared text helpers: word tokens, content words, and the lazily loaded VADER analyser."""

from __future__ import annotations

import functools
import re

WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?", re.UNICODE)

# A small English stop-word list (function words, auxiliaries, pronouns, fillers common
# in chat), so overlap counts words that carry the topic.
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do
    does doesn't doing don't down during each few for from further had hadn't has hasn't
    have haven't having he he'd he'll he's her here here's hers herself him himself his
    how how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most
    mustn't my myself no nor not of off on once only or other ought our ours ourselves out
    over own same shan't she she'd she'll she's should shouldn't so some such than that
    that's the their theirs them themselves then there there's these they they'd they'll
    they're they've this those through to too under until up very was wasn't we we'd we'll
    we're we've were weren't what what's when when's where where's which while who who's
    whom why why's with won't would wouldn't you you'd you'll you're you've your yours
    yourself yourselves yeah yes yep ok okay oh um uh hmm well just really like get got
    go going know think also lol haha
    """.split()
)


def words(text: str | None) -> list[str]:
    """Lower-cased word tokens (letters and digits in any script; inner apostrophes)."""
    return WORD.findall(text.lower()) if text else []


def content_words(text: str | None) -> set[str]:
    return {w for w in words(text) if w not in STOP_WORDS}


@functools.cache
def vader():
    """The VADER analyser, loaded once on first use."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str | None) -> float:
    """VADER compound score in [-1, 1]; 0 for missing or empty text."""
    if not text or not text.strip():
        return 0.0
    return _compound(text)


@functools.lru_cache(maxsize=65536)
def _compound(text: str) -> float:
    # cached: a user turn is scored as one bot turn's reply and the next one's prompt
    return float(vader().polarity_scores(text)["compound"])
