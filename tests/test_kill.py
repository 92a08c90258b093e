"""Kill tests for every long job: SIGKILL at a seeded random point, then the database is
whole (``rapport db check``), the same command run again completes, and the end state
equals that of a run never interrupted (rows, rewards, files).

``train`` has its own (tests/test_train_cli.py), and so do ``deploy`` and
``rollback`` (tests/test_deploy.py). Each job here runs on a copy of the same database
twice: once killed and re-run, once straight through, and the two end states are
compared. A kill point is either a seeded amount of work done (rows committed, seen
from another connection) or a seeded delay into the work, or, for the jobs that write a
file, a seeded choice that includes the moment the file is written but not yet renamed
(``RAPPORT_FAULT_POINT``, :func:`bot.files.fault_point`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest

from bot.check import check
from bot.corpora import CHITCHAT_PLATFORM, chitchat_conversations
from bot.store import Store
from tests.conftest import BUSY_MACHINE, run_rapport

SEED = 15


def rapport_process(args: list[str], home: Path, env: dict | None = None, stderr=None):
    return subprocess.Popen(
        [sys.executable, "-m", "bot.loop.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=stderr or subprocess.DEVNULL,
        env={**os.environ, "RAPPORT_HOME": str(home), "OMP_NUM_THREADS": "1", **(env or {})},
    )


def kill_when(proc: subprocess.Popen, ready, delay: float = 0.0, timeout: float = 120) -> None:
    """SIGKILL ``proc`` ``delay`` seconds after ``ready()`` first holds; the job must
    still be at work then (a kill that comes too late tests nothing)."""
    deadline = time.monotonic() + timeout * BUSY_MACHINE
    while not ready():
        assert proc.poll() is None, "the job finished before its kill point"
        assert time.monotonic() < deadline, "the job never reached its kill point"
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, "the job finished before its kill point"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def kill_at_random(args: list[str], home: Path, took: float) -> None:
    """SIGKILL ``rapport ARGS`` at a seeded moment within the time a whole run ``took``
    (for a short job: it may land in start-up, in the work, or after the job ended)."""
    proc = rapport_process(args, home)
    try:
        proc.wait(timeout=random.Random(SEED).uniform(0.0, 0.9) * took)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def count(home: Path, sql: str) -> int:
    """A count read beside the running job (read-only, as a second process would)."""
    path = home / "rapport.db"
    if not path.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(sql).fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:  # not created or migrated yet
        return 0


def assert_whole(home: Path) -> None:
    result = run_rapport("db", "check", env={"RAPPORT_HOME": str(home)})
    assert result.returncode == 0 and result.stdout.startswith("ok: integrity ok"), (
        result.stdout + result.stderr
    )


def clone(home: Path, to: Path) -> Path:
    """A second home with a copy of ``home``'s database and pseudonym key."""
    to.mkdir()
    (home / "models").mkdir(exist_ok=True)  # converted models are shared, not rebuilt
    (to / "models").symlink_to(home / "models")
    with Store(home / "rapport.db") as store:
        store.backup(to / "rapport.db")
    shutil.copy(home / "rapport.db.key", to / "rapport.db.key")
    return to


def state(home: Path) -> dict:
    """Everything a job leaves in the database, keyed by what it means, not by row ids."""
    db = sqlite3.connect(home / "rapport.db")
    try:
        key = "c.platform, c.external_id, m.turn_index"
        return {
            "conversations": db.execute(
                "SELECT platform, external_id, user_id, model_version, end_reason "
                "FROM conversations ORDER BY platform, external_id"
            ).fetchall(),
            "messages": db.execute(
                f"SELECT {key}, m.role, m.author, m.user_id, m.text, m.model_version, "
                "m.generation FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                "ORDER BY 1, 2, 3"
            ).fetchall(),
            "rewards": db.execute(
                f"SELECT {key}, r.name, round(r.value, 9), r.scorer_version FROM rewards r "
                "JOIN messages m ON m.id = r.message_id "
                "JOIN conversations c ON c.id = m.conversation_id ORDER BY 1, 2, 3, 4"
            ).fetchall(),
            "scoring": db.execute("SELECT COUNT(*) FROM scoring").fetchone()[0],
        }
    finally:
        db.close()


def run_in(home: Path, *args: str, timeout=300):
    result = run_rapport(*args, env={"RAPPORT_HOME": str(home)}, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result


# -- rapport import ---------------------------------------------------------------------


def test_import_killed_at_a_random_batch_then_rerun_equals_one_uninterrupted_import(
    rapport_home, tmp_path
):
    rng = random.Random(SEED)
    path = tmp_path / "log.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(3000):
            turns = [{"role": "user", "text": f"hi {i} 😂"}, {"role": "bot", "text": f"yo {i}"}]
            f.write(json.dumps({"id": f"c{i}", "speaker": f"s{i % 7}", "turns": turns}) + "\n")
    Store(rapport_home / "rapport.db").close()  # the pseudonym key both runs hash with
    straight = clone(rapport_home, tmp_path / "straight")
    run_in(straight, "import", "jsonl", str(path))

    done = rng.choice([500, 1000, 1500, 2000, 2500])  # every 500 conversations commit
    proc = rapport_process(["import", "jsonl", str(path)], rapport_home)
    kill_when(proc, lambda: count(rapport_home, "SELECT COUNT(*) FROM conversations") >= done)
    assert 0 < count(rapport_home, "SELECT COUNT(*) FROM conversations") < 3000
    assert_whole(rapport_home)
    again = run_in(rapport_home, "import", "jsonl", str(path))
    assert "imported" in again.stdout and "; 0 bad lines skipped" in again.stdout
    assert state(rapport_home) == state(straight)
    assert len(state(rapport_home)["messages"]) == 6000


# -- rapport score ----------------------------------------------------------------------


@pytest.fixture
def imported_home(rapport_home) -> Path:
    with Store(rapport_home / "rapport.db") as store:
        store.import_conversations(CHITCHAT_PLATFORM, list(islice(chitchat_conversations(), 60)))
    return rapport_home


def test_score_killed_at_a_random_batch_then_rerun_gives_the_rewards_of_one_run(
    imported_home, tmp_path
):
    home = imported_home
    straight = clone(home, tmp_path / "straight")
    env = {"RAPPORT_SCORING_BATCH_CONVERSATIONS": "5"}
    result = run_rapport("score", env={"RAPPORT_HOME": str(straight), **env}, timeout=300)
    assert result.returncode == 0, result.stderr

    bot_turns = count(home, "SELECT COUNT(*) FROM messages WHERE role = 'bot'")
    done = random.Random(SEED).randrange(1, bot_turns // 2)
    proc = rapport_process(["score"], home, env)
    kill_when(proc, lambda: count(home, "SELECT COUNT(*) FROM scoring") >= done)
    assert 0 < count(home, "SELECT COUNT(*) FROM scoring") < bot_turns
    assert_whole(home)
    result = run_rapport("score", env={"RAPPORT_HOME": str(home), **env}, timeout=300)
    assert result.returncode == 0, result.stderr
    assert state(home) == state(straight)
    assert state(home)["scoring"] == bot_turns


# -- rapport simulate -------------------------------------------------------------------


def simulate_args(model: Path) -> list[str]:
    return [
        "--set",
        "generation.max_new_tokens=4",
        "--set",
        f"model.path={model}",
        "simulate",
        "--n",
        "8",
        "--turns",
        "2",
        "--batch",
        "2",
        "--seed",
        "3",
    ]


def test_simulate_killed_at_a_random_batch_then_rerun_logs_what_one_run_logs(
    tiny_model_dir, rapport_home, tmp_path
):
    args = simulate_args(tiny_model_dir)
    Store(rapport_home / "rapport.db").close()
    straight = clone(rapport_home, tmp_path / "straight")
    run_in(straight, *args)

    done = random.Random(SEED).choice([2, 4, 6])  # conversations: whole batches commit
    proc = rapport_process(args, rapport_home)
    kill_when(proc, lambda: count(rapport_home, "SELECT COUNT(*) FROM conversations") >= done)
    assert 0 < count(rapport_home, "SELECT COUNT(*) FROM conversations") < 8
    assert_whole(rapport_home)
    again = run_in(rapport_home, *args)
    assert "simulated" in again.stdout
    assert state(rapport_home) == state(straight)
    assert len(state(rapport_home)["conversations"]) == 8


# -- rapport eval -----------------------------------------------------------------------


def test_eval_killed_at_a_random_moment_then_rerun_writes_what_one_run_writes(
    tiny_model_dir, rapport_home, tmp_path
):
    args = [
        "--set",
        "generation.max_new_tokens=4",
        "--set",
        f"model.path={tiny_model_dir}",
        "eval",
        str(tiny_model_dir),
        "--n",
        "3",
        "--turns",
        "2",
        "--seed",
        "5",
    ]
    from rewards.embedding import openvino_model_dir

    openvino_model_dir()  # converted once, before the runs are timed
    straight = tmp_path / "straight.json"
    log = tmp_path / "straight.log"
    with open(log, "wb") as err:  # the evaluation's own time: from its first progress line
        proc = rapport_process([*args, "--out", str(straight)], rapport_home, stderr=err)
        while b"evaluating" not in log.read_bytes() and proc.poll() is None:
            time.sleep(0.005)
        started = time.monotonic()
        assert proc.wait() == 0, log.read_text()
        took = time.monotonic() - started

    out = tmp_path / "eval.json"
    log = tmp_path / "killed.log"
    with open(log, "wb") as err:
        proc = rapport_process([*args, "--out", str(out)], rapport_home, stderr=err)
        # a seeded moment in the first half of the self-play and scoring
        delay = random.Random(SEED).uniform(0.0, 0.5) * took
        kill_when(proc, lambda: b"evaluating" in log.read_bytes(), delay=delay)
    # an evaluation writes its file whole or not at all: a kill that lands after the
    # rename (the killed run may go faster than the straight one did) finds it whole
    assert not out.exists() or json.loads(out.read_text()) == json.loads(straight.read_text())
    assert_whole(rapport_home)
    if out.exists():  # the rerun would rightly refuse to overwrite a finished file
        return
    run_in(rapport_home, *args, "--out", str(out))
    assert json.loads(out.read_text()) == json.loads(straight.read_text())


# -- rapport export and rapport db backup ----------------------------------------------


@pytest.fixture
def scored_home(imported_home) -> Path:
    from bot.config import Config
    from rewards.score import score_store

    with Store(imported_home / "rapport.db") as store:
        score_store(store, Config())
    return imported_home


def timed(home: Path, *args: str) -> float:
    started = time.monotonic()
    run_in(home, *args)
    return time.monotonic() - started


@pytest.mark.parametrize("point", ["export-written", "random"])
def test_export_killed_then_rerun_writes_the_file_one_run_writes(scored_home, tmp_path, point):
    home = scored_home
    straight = tmp_path / "straight.jsonl"
    took = timed(home, "export", str(straight), "--format", "jsonl")
    out = tmp_path / "export.jsonl"
    out.write_text("the previous export\n")  # --force replaces it only with a whole one
    args = ["export", str(out), "--format", "jsonl", "--force"]
    if point == "random":
        kill_at_random(args, home, took)
        assert out.read_bytes() in (b"the previous export\n", straight.read_bytes())
    else:
        killed = run_rapport(*args, env={"RAPPORT_HOME": str(home), "RAPPORT_FAULT_POINT": point})
        assert killed.returncode == -signal.SIGKILL
        assert out.read_text() == "the previous export\n"
    assert_whole(home)
    run_in(home, *args)
    assert out.read_bytes() == straight.read_bytes()
    assert not out.with_name(out.name + ".tmp").exists()  # no debris once it completed
    assert len(out.read_text().splitlines()) == 60


def tables(path: Path) -> dict[str, list]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {n: sorted(db.execute(f"SELECT * FROM [{n}]").fetchall(), key=repr) for n in names}
    finally:
        db.close()


@pytest.mark.parametrize("point", ["backup-written", "random"])
def test_db_backup_killed_then_rerun_writes_the_copy_one_run_writes(scored_home, tmp_path, point):
    home = scored_home
    straight = tmp_path / "straight.db"
    took = timed(home, "db", "backup", str(straight))
    copy = tmp_path / "backup.db"
    args = ["db", "backup", str(copy), "--force"]
    if point == "random":
        kill_at_random(args, home, took)
        assert not copy.exists() or tables(copy) == tables(straight)
    else:
        killed = run_rapport(*args, env={"RAPPORT_HOME": str(home), "RAPPORT_FAULT_POINT": point})
        assert killed.returncode == -signal.SIGKILL
        assert not copy.exists()  # never half a backup under the name
    assert_whole(home)
    run_in(home, *args)
    assert tables(copy) == tables(straight)
    assert not copy.with_name(copy.name + ".tmp").exists()
    assert len(tables(copy)["rewards"]) > 0
    assert check(copy).verdict().startswith("ok: integrity ok")
