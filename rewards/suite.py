"""The reward signals rapport scores, in one explicit list.

A signal's name is its function's ``__name__``; it is the ``name`` column of the
``rewards`` table and the key of its weight in the ``[rewards]`` config section.
``combined`` is the weighted sum of the normalised signals (:mod:`rewards.combine`).
"""

from __future__ import annotations

from rewards.bot_question import bot_question
from rewards.bot_repetition import bot_repetition
from rewards.bot_sentiment import bot_sentiment
from rewards.bot_unsafe import bot_unsafe
from rewards.embedding_similarity import embedding_similarity
from rewards.manual_vote import manual_vote
from rewards.user_continued import user_continued
from rewards.user_laughter import user_laughter
from rewards.user_rating import user_rating
from rewards.user_reply_latency import user_reply_latency
from rewards.user_reply_length import user_reply_length
from rewards.user_retry import user_retry
from rewards.user_sentiment import user_sentiment
from rewards.user_sentiment_transition import user_sentiment_transition
from rewards.word_similarity import word_similarity

SIGNALS = (
    user_sentiment,
    user_sentiment_transition,
    user_laughter,
    user_reply_length,
    user_reply_latency,
    user_continued,
    user_retry,
    user_rating,
    bot_question,
    bot_sentiment,
    bot_repetition,
    bot_unsafe,
    word_similarity,
    embedding_similarity,
    manual_vote,
)
SIGNAL_NAMES = tuple(signal.__name__ for signal in SIGNALS)
COMBINED = "combined"
# Bump when any signal's definition changes: scores of an older version are redone.
# 2: bot_question by syntax, more laughter, user_continued (issue 14)
# 3: user_retry, and retried replies leave the conversation's path (issue 14)
# 4: user_rating (end-of-chat ratings), and a rating rescores its conversation
# 5: user_reply_latency
# 6: bot_unsafe, and a reply the safety filter withdrew is no user_retry
SCORER_VERSION = "6"


def score_contexts(contexts) -> dict[str, list[float]]:
    """Every signal on a batch of contexts: {name: values in context order}."""
    return {signal.__name__: signal(contexts) for signal in SIGNALS}
