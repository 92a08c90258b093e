"""Training runs on disk: ``$RAPPORT_HOME/runs/NAME``, what each one costs, and pruning.

A token-level run keeps one checkpoint while it trains (the network, its target copy
and AdamW's two moments, all fp32: about 4x the model, 2.2 GB for SmolLM2-135M), so a
killed run resumes exactly. Once the run has finished and its model is registered, the
checkpoint is deleted and the run keeps its model folder (about 1x the model) and its
metrics. A process that trains a run holds a lock on it, so pruning (or a second
``--resume``) never touches a run in progress.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bot.errors import RapportError

CHECKPOINT = "checkpoint"
LOCK = "lock"


class RunBusy(RapportError):
    """Another process is training this run."""


@contextmanager
def hold(run_dir: Path) -> Iterator[None]:
    """Mark ``run_dir`` as in progress for as long as the block runs (released by the
    kernel if the process dies)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"run {run_dir.name} is being trained by another process") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def in_progress(run_dir: Path) -> bool:
    try:
        with open(run_dir / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(f, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def size_of(path: Path) -> int:
    """Bytes of every file under ``path`` (0 if it is gone)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while we looked
    return total


@dataclass
class Run:
    name: str
    path: Path
    bytes: int
    checkpoint_bytes: int
    state: str  # in progress | registered | resumable | unfinished
    version: str | None  # the model version registered from it


def list_runs(runs_dir: Path, registered: dict[str, str]) -> list[Run]:
    """Every run folder, oldest first. ``registered`` maps version -> model folder."""
    by_folder = {str(Path(p).resolve()): v for v, p in registered.items()}
    runs = []
    if not runs_dir.is_dir():
        return runs
    for path in sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=_created):
        version = by_folder.get(str((path / "model").resolve()))
        checkpoint = path / CHECKPOINT
        if in_progress(path):
            state = "in progress"
        elif version:
            state = "registered"
        elif (checkpoint / "state.pt").exists():
            state = "resumable"
        else:
            state = "unfinished"
        runs.append(Run(path.name, path, size_of(path), size_of(checkpoint), state, version))
    return runs


def _created(path: Path) -> float:
    return path.stat().st_mtime


def prune(runs: list[Run], resumable: bool = False, dry_run: bool = False) -> int:
    """Free what no one needs: the checkpoints left in registered runs, and the runs
    that neither served a version nor can resume (``resumable=True``: those too).
    Never a run in progress, never a registered model's folder. Returns bytes freed."""
    freed = 0
    for run in runs:
        if run.state == "registered":
            target, size = run.path / CHECKPOINT, run.checkpoint_bytes
        elif run.state == "unfinished" or (run.state == "resumable" and resumable):
            target, size = run.path, run.bytes
        else:
            continue
        if size and not dry_run:
            shutil.rmtree(target, ignore_errors=True)
        freed += size
    return freed


def drop_checkpoint(run_dir: Path) -> None:
    """After a run's model is registered: resuming is no longer possible or needed."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old", f"{CHECKPOINT}.tmp"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
