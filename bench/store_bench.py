"""Store write throughput: committed turns per second.

Rows compared on the same machine, in the same run:

- ``rapport Store, 1 writer``: ``Store.add_message``, each turn its own BEGIN IMMEDIATE
  transaction (validation, opt-out check, next turn index, insert, commit).
- ``rapport Store, 4 writer processes``: the same, four processes on one file at once.
- ``sqlite3, 1 txn per turn`` (peer): plain ``sqlite3`` with the same pragmas
  (WAL, synchronous=NORMAL), one INSERT and COMMIT per turn.
- ``sqlite3 executemany, 1 txn`` (limit): all rows in one transaction.

Goal (issue 2): >= 2,000 turns/s with one writer, and within 3x of the plain-sqlite3
per-transaction figure.

Run: ``make bench`` or ``.venv/bin/python bench/store_bench.py [--turns N]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.store import Store, now  # noqa: E402

TEXT = "that sounds like a lot of fun, what did you like most about it?"


def store_writer(path: str, name: str, turns: int) -> float:
    store = Store(path)
    user = store.ensure_user("bench", name)
    conv = store.start_conversation(user, "bench")
    start = time.perf_counter()
    for i in range(turns):
        store.add_message(conv, "user" if i % 2 == 0 else "bot", TEXT)
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed


def _worker(args: tuple[str, str, int]) -> float:
    return store_writer(*args)


def concurrent_store(path: str, writers: int, turns: int) -> float:
    Store(path).close()
    start = time.perf_counter()
    with mp.get_context("spawn").Pool(writers) as pool:
        pool.map(_worker, [(path, f"w{i}", turns) for i in range(writers)])
    return time.perf_counter() - start


def plain_connection(path: str) -> sqlite3.Connection:
    Store(path).close()  # same schema as the store
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "INSERT INTO users (id, platform, created, opted_out) VALUES ('u', 'bench', ?, 0)",
        [now()],
    )
    conn.execute(
        "INSERT INTO conversations (id, user_id, platform, started) VALUES (1, 'u', 'bench', ?)",
        [now()],
    )
    return conn


def rows(turns: int) -> list[tuple]:
    return [
        (1, i, "user" if i % 2 == 0 else "bot", "person", "u", TEXT, now()) for i in range(turns)
    ]


INSERT = (
    "INSERT INTO messages (conversation_id, turn_index, role, author, user_id, text, created)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def plain_per_transaction(path: str, turns: int) -> float:
    conn = plain_connection(path)
    data = rows(turns)
    start = time.perf_counter()
    for row in data:
        conn.execute("BEGIN")
        conn.execute(INSERT, row)
        conn.execute("COMMIT")
    return time.perf_counter() - start


def plain_executemany(path: str, turns: int) -> float:
    conn = plain_connection(path)
    data = rows(turns)
    start = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(INSERT, data)
    conn.execute("COMMIT")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=5000, help="turns per writer")
    args = parser.parse_args()
    n = args.turns
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            ("rapport Store, 1 writer", n, store_writer(f"{tmp}/a.db", "solo", n)),
            ("rapport Store, 4 writer processes", 4 * n, concurrent_store(f"{tmp}/b.db", 4, n)),
            ("sqlite3, 1 txn per turn (peer)", n, plain_per_transaction(f"{tmp}/c.db", n)),
            ("sqlite3 executemany, 1 txn (limit)", n, plain_executemany(f"{tmp}/d.db", n)),
        ]
    print(f"{'writer':<38} {'turns':>8} {'seconds':>9} {'turns/s':>10}")
    rates = {}
    for name, count, seconds in results:
        rates[name] = count / seconds
        print(f"{name:<38} {count:>8} {seconds:>9.3f} {rates[name]:>10,.0f}")
    solo = rates["rapport Store, 1 writer"]
    peer = rates["sqlite3, 1 txn per turn (peer)"]
    print(
        f"\none writer: {solo:,.0f} turns/s (goal >= 2,000): {'PASS' if solo >= 2000 else 'FAIL'}"
    )
    print(
        f"plain sqlite3 per-transaction / Store: {peer / solo:.2f}x (goal <= 3x): "
        f"{'PASS' if peer / solo <= 3 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
