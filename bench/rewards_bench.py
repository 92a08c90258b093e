"""Reward scoring throughput on the imported chitchat corpus (CPU).

Rows, in the same run on the same bot turns:

- ``rapport score (whole suite)``: ``rewards.score.score_store`` end to end: reading the
  conversations, every signal, writing the raw values and marks, refitting the
  combined reward;
- one row per signal: that signal alone on all the bot turns' contexts;
- ``raw MiniLM encode (limit)``: the embedding model's own batched ``encode`` of the
  same distinct utterances, at the same precision: the floor that the whole suite can
  approach, since each utterance is embedded once.

Goal (issue 4): the whole suite >= 400 bot turns/s on 2 cores, and within 1.3x of the
raw encode cost of the same utterances.

Run: ``.venv/bin/python bench/rewards_bench.py [--conversations N]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.config import Config  # noqa: E402
from bot.corpora import CHITCHAT_PLATFORM, chitchat_conversations  # noqa: E402
from bot.store import Store  # noqa: E402
from rewards.bot_repetition import ngram_set  # noqa: E402
from rewards.embedding import BATCH_SIZE, encoder  # noqa: E402
from rewards.score import contexts_of, score_store  # noqa: E402
from rewards.suite import SIGNALS  # noqa: E402
from rewards.text import _compound  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--conversations", type=int, default=1500, help="chitchat conversations to use"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        conversations = list(islice(chitchat_conversations(), args.conversations))
        store.import_conversations(CHITCHAT_PLATFORM, conversations)
        encoder().encode(["warm up"])  # load the model outside the timings

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
        encoder().encode(utterances, batch_size=BATCH_SIZE, show_progress_bar=False)
        raw_s = time.perf_counter() - start
        rows.append(("raw MiniLM encode (limit)", len(contexts), raw_s))
        store.close()

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


if __name__ == "__main__":
    main()
