"""embedding_similarity: is the bot turn about what the user said?

Scores: the bot turn against the user turn it answers. Formula: cosine similarity of
all-MiniLM-L6-v2 sentence embeddings, in [-1, 1]. Jaques et al. 2019 ("USE similarity",
with the Universal Sentence Encoder). 0 when the bot spoke first (no user turn).

>>> from rewards.context import Context
>>> on, off = embedding_similarity([
...     Context("Dogs are such loyal pets.", prev_user="I just adopted a puppy!"),
...     Context("The stock market fell today.", prev_user="I just adopted a puppy!"),
... ])
>>> on > off
True
"""

from __future__ import annotations

from rewards.context import Context
from rewards.embedding import embed_unique


def embedding_similarity(contexts: list[Context]) -> list[float]:
    texts = [c.bot for c in contexts] + [c.prev_user for c in contexts if c.prev_user]
    vectors = embed_unique(texts)
    return [
        # clamped: float rounding can put a text's similarity to itself just above 1
        min(max(float(vectors[c.bot] @ vectors[c.prev_user]), -1.0), 1.0) if c.prev_user else 0.0
        for c in contexts
    ]
