"""Reward scoring throughput on the imported chitchat corpus (CPU).

Rows, in the same run on the same bot turns (the suite and the raw encode timed
``--repeats`` times, alternately, best of each):

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

Run: ``.venv/bin/python bench/rewards_bench.py [--conversations N] [--backend torch]
[--repeats N]``.
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


def parse_args() -> argparse.Namespace:
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
        "--repeats",
        type=int,
        default=3,
        help="times the suite and the raw encode are timed, alternately; the best counts",
    )
    parser.add_argument(
        "--quality", type=int, default=500, help="utterances for the check against fp32"
    )
    return parser.parse_args()


def time_suite_and_encode(tmp: Path, conversations: list, utterances: list[str], repeats: int):
    """(wall, CPU) seconds of each whole-suite run (on a fresh store) and each raw encode.

    Alternating makes a burst of load from other processes hit both rows alike, and the
    best of each is the least disturbed estimate of its cost. CPU seconds count every
    thread of this process: on a shared machine, CPU / cores is what the wall time would
    be on idle cores if the work kept them all busy.
    """
    suite, raw = [], []
    for repeat in range(repeats):
        store = Store(tmp / f"bench-{repeat}.db")
        store.import_conversations(CHITCHAT_PLATFORM, conversations)
        start, cpu = time.perf_counter(), time.process_time()
        score_store(store, Config())
        suite.append((time.perf_counter() - start, time.process_time() - cpu))
        store.close()
        start, cpu = time.perf_counter(), time.process_time()
        embedding.encoder(embedding.PRECISION, embedding.BACKEND).encode(utterances)
        raw.append((time.perf_counter() - start, time.process_time() - cpu))
    return suite, raw


def time_signals(contexts: list) -> list[tuple[str, float]]:
    """Seconds of each signal alone on all the contexts, each with cold caches."""
    rows = []
    for signal in SIGNALS:
        _compound.cache_clear()  # each row pays for its own VADER and n-gram work
        ngram_set.cache_clear()
        start = time.perf_counter()
        signal(contexts)
        rows.append((f"  {signal.__name__}", time.perf_counter() - start))
    return rows


def cosines_to_fp32(utterances: list[str], count: int) -> torch.Tensor:
    """Cosine of each of ``count`` utterances' embeddings to sentence-transformers' fp32."""
    sample = utterances[:: max(1, len(utterances) // count)][:count]
    fast = embedding.encoder(embedding.PRECISION, embedding.BACKEND).encode(sample)
    reference = embedding.encoder("fp32", "torch").encode(sample)
    return torch.nn.functional.cosine_similarity(fast, reference)


def main() -> None:
    args = parse_args()
    embedding.BACKEND = args.backend  # what embedding_similarity reads
    load_before = os.getloadavg()[0]
    conversations = list(islice(chitchat_conversations(), args.conversations))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "contexts.db")
        store.import_conversations(CHITCHAT_PLATFORM, conversations)
        turns = store.conversation_turns(store.conversations_to_score("1"))
        contexts = [c for conversation in turns.values() for _, c in contexts_of(conversation)]
        store.close()
        utterances = sorted(
            {c.bot for c in contexts} | {c.prev_user for c in contexts if c.prev_user}
        )
        # load (and convert) the model outside the timings
        embedding.encoder(embedding.PRECISION, args.backend).encode(["warm up"])
        suite, raw = time_suite_and_encode(Path(tmp), conversations, utterances, args.repeats)
    signal_rows = time_signals(contexts)
    load_after = os.getloadavg()[0]
    cosines = cosines_to_fp32(utterances, args.quality)

    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")
    print(f"embedding backend: {args.backend}, {embedding.PRECISION}")
    print(f"{len(contexts):,} bot turns, {len(utterances):,} distinct utterances embedded")
    print(f"{'scorer':<34} {'seconds':>9} {'bot turns/s':>12}")
    suite_s, raw_s = min(wall for wall, _ in suite), min(wall for wall, _ in raw)
    rows = [("rapport score (whole suite)", suite_s)]
    rows += signal_rows + [("raw MiniLM encode (limit)", raw_s)]
    for name, seconds in rows:
        print(f"{name:<34} {seconds:>9.2f} {len(contexts) / seconds:>12,.0f}")
    print(f"whole-suite runs (wall/CPU s): {', '.join(f'{w:.1f}/{c:.1f}' for w, c in suite)}")
    print(f"raw encode runs (wall/CPU s): {', '.join(f'{w:.1f}/{c:.1f}' for w, c in raw)}")
    print(f"raw encode rate (best): {len(utterances) / raw_s:,.0f} utterances/s")
    print(
        f"\nwhole suite: {len(contexts) / suite_s:,.0f} bot turns/s (goal >= 400); "
        f"{suite_s / raw_s:.2f}x the raw encode cost (goal <= 1.3x)"
    )
    cores = os.cpu_count() or 1
    suite_cpu = min(c for _, c in suite)
    print(
        f"if the {cores} cores were idle (best CPU s / {cores}): "
        f"{len(contexts) * cores / suite_cpu:,.0f} bot turns/s (an estimate, not a timing)"
    )
    print(
        f"cosine to fp32 PyTorch on {len(cosines)} utterances: "
        f"mean {cosines.mean():.5f}, min {cosines.min():.5f}"
    )


if __name__ == "__main__":
    main()
