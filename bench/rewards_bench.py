"""Reward scoring throughput on the imported chitchat corpus (CPU).

Rows, in the same run on the same bot turns:

- ``rapport score (whole suite)``: ``rewards.score.score_store`` end to end: reading the
  conversations, every signal, writing the raw values and marks, refitting the
  combined reward;
- one row per signal: that signal alone on all the bot turns' contexts;
- ``raw MiniLM encode (limit)``: the embedding model's own batched ``encode`` of the
  same distinct utterances, on the same backend at the same precision: the floor that the
  whole suite can approach, since each utterance is embedded once.

Then the quality of that backend: cosine of its embeddings to sentence-transformers' fp32
PyTorch ones, on a spread of the same utterances (mean and min). The load average is
printed before and after: on a shared machine, compare rows of one run only.

Goal (issue 4): the whole suite >= 400 bot turns/s on 2 cores, and within 1.3x of the
raw encode cost of the same utterances.

Run: ``.venv/bin/python bench/rewards_bench.py [--conversations N] [--backend torch]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bot.config import Config  # noqa: E402
from bot.corpora import CHITCHAT_PLATFORM, chitchat_conversations  # noqa: E402
from bot.store import Store  # noqa: E402
from rewards import embedding  # noqa: E402
from rewards.bot_repetition import ngram_set  # noqa: E402
from rewards.score import contexts_of, score_store  # noqa: E402
from rewards.suite import SIGNALS  # noqa: E402
from rewards.text import _compound  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--conversations", type=int, default=1500, help="chitchat conversations to use"
    )
    parser.add_argument(
        "--backend",
        choices=["openvino", "torch"],
        default=embedding.BACKEND,
        help="embedding backend (default: the one rapport uses here)",
    )
    parser.add_argument(
        "--quality", type=int, default=500, help="utterances for the check against fp32"
    )
    args = parser.parse_args()
    embedding.BACKEND = args.backend  # what embedding_similarity reads
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        conversations = list(islice(chitchat_conversations(), args.conversations))
        store.import_conversations(CHITCHAT_PLATFORM, conversations)
        encoder = embedding.encoder(embedding.PRECISION, args.backend)
        encoder.encode(["warm up"])  # load (and convert) the model outside the timings

        ids = store.conversations_to_score("1")
        contexts = [
            c for turns in store.conversation_turns(ids).values() for _, c in contexts_of(turns)
        ]
        utterances = sorted(
            {c.bot for c in contexts} | {c.prev_user for c in contexts if c.prev_user}
        )

        start = time.perf_counter()
        summary = score_store(store, Config())
        suite_s = time.perf_counter() - start
        assert summary.bot_turns == len(contexts)

        rows = [("rapport score (whole suite)", len(contexts), suite_s)]
        for signal in SIGNALS:
            _compound.cache_clear()  # each row pays for its own VADER and n-gram work
            ngram_set.cache_clear()
            start = time.perf_counter()
            signal(contexts)
            rows.append((f"  {signal.__name__}", len(contexts), time.perf_counter() - start))
        start = time.perf_counter()
        encoder.encode(utterances)
        raw_s = time.perf_counter() - start
        rows.append(("raw MiniLM encode (limit)", len(contexts), raw_s))
        store.close()
    load_after = os.getloadavg()[0]

    sample = utterances[:: max(1, len(utterances) // args.quality)][: args.quality]
    reference = embedding.encoder("fp32", "torch").encode(sample)
    cosines = torch.nn.functional.cosine_similarity(encoder.encode(sample), reference)

    print(f"load average after: {load_after:.2f}")
    print(f"embedding backend: {args.backend}, {embedding.PRECISION}")
    print(f"{len(contexts):,} bot turns, {len(utterances):,} distinct utterances embedded")
    print(f"{'scorer':<34} {'seconds':>9} {'bot turns/s':>12}")
    for name, count, seconds in rows:
        print(f"{name:<34} {seconds:>9.2f} {count / seconds:>12,.0f}")
    print(f"raw encode rate: {len(utterances) / raw_s:,.0f} utterances/s")
    rate = len(contexts) / suite_s
    print(
        f"\nwhole suite: {rate:,.0f} bot turns/s (goal >= 400); "
        f"{suite_s / raw_s:.2f}x the raw encode cost (goal <= 1.3x)"
    )
    print(
        f"cosine to fp32 PyTorch on {len(sample)} utterances: "
        f"mean {cosines.mean():.5f}, min {cosines.min():.5f}"
    )


if __name__ == "__main__":
    main()
