"""Durability under real processes: SIGKILL, concurrent writers, long readers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

from bot.store import Store

WRITER = textwrap.dedent(
    """
    import sys, time
    from bot.store import Store
    path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = Store(path)
    user = store.ensure_user("test", name)
    conv = store.start_conversation(user, "test")
    for i in range(n):
        store.add_message(conv, "user" if i % 2 == 0 else "bot", f"{name} turn {i}")
        if n == 1:
            print("committed", flush=True)
            time.sleep(60)
    """
)


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, *args], stdout=subprocess.PIPE, text=True
    )


def test_sigkill_right_after_add_message_loses_nothing(tmp_path):
    path = str(tmp_path / "r.db")
    proc = spawn(path, "killed", "1")
    assert proc.stdout.readline().strip() == "committed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Store(path) as store:
        (conv,) = [r["id"] for r in store.db["conversations"].rows]
        assert [m.text for m in store.messages(conv)] == ["killed turn 0"]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_two_processes_writing_1000_turns_each_lose_none(tmp_path):
    path = str(tmp_path / "r.db")
    Store(path).close()  # created once, so both writers only append
    procs = [spawn(path, name, "1000") for name in ("a", "b")]
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    with Store(path) as store:
        assert store.counts()["messages"] == 2000
        for name in ("a", "b"):
            rows = store.db.execute(
                "SELECT turn_index, text FROM messages m JOIN conversations c "
                "ON c.id = m.conversation_id JOIN users u ON u.id = c.user_id "
                "WHERE m.text LIKE ? ORDER BY turn_index",
                [f"{name} turn %"],
            ).fetchall()
            assert [r[0] for r in rows] == list(range(1000))
            assert [r[1] for r in rows] == [f"{name} turn {i}" for i in range(1000)]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_reader_holding_a_long_transaction_does_not_block_the_writer(tmp_path):
    path = str(tmp_path / "r.db")
    store = Store(path, busy_timeout_s=2)
    user = store.ensure_user("test", "w")
    conv = store.start_conversation(user, "test")
    store.add_message(conv, "user", "before the reader")

    reader = sqlite3.connect(path)
    reader.execute("BEGIN")
    assert reader.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
    done = threading.Event()

    def write():
        for i in range(20):
            store.add_message(conv, "user", f"while reading {i}")
        done.set()

    start = time.monotonic()
    thread = threading.Thread(target=write)
    thread.start()
    thread.join(timeout=10)
    assert done.is_set() and time.monotonic() - start < 2
    # the reader still sees its snapshot, then the new rows after it ends
    assert reader.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
    reader.execute("COMMIT")
    assert reader.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 21
    reader.close()
    store.close()


def test_a_locked_database_is_one_readable_error_and_loses_nothing_committed(tmp_path):
    from bot.errors import StoreError

    path = str(tmp_path / "r.db")
    store = Store(path, busy_timeout_s=0.2)
    user = store.ensure_user("test", "w")
    conv = store.start_conversation(user, "test")
    store.add_message(conv, "user", "kept")
    blocker = sqlite3.connect(path)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        store.add_message(conv, "user", "refused")
    except StoreError as e:
        assert "locked by another process" in str(e)
    else:
        raise AssertionError("write went through a held write lock")
    finally:
        blocker.rollback()
        blocker.close()
    store.add_message(conv, "user", "after the lock")
    assert [m.text for m in store.messages(conv)] == ["kept", "after the lock"]
