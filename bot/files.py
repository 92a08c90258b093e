"""Files a user names on the command line: one rule for every command that writes one
(``export``, ``db backup``, ``eval --out``). The folder must exist (a typo in a path
should not grow a tree of folders), and an existing file is kept unless ``--force``.

Such a file is written whole beside its name, then renamed over it: a command killed
half-way leaves the old file (or none), never half of one. :func:`fault_point` marks the
moments in between for the kill tests."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from bot.errors import RapportError


def new_file(path: str | Path, force: bool = False) -> Path:
    """``path`` as a file this command may write, or one readable line saying why not."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise RapportError(f"{path} is a folder; name a file inside it")
    folder = path.parent
    if not folder.is_dir():
        raise RapportError(f"folder {folder} does not exist; create it first (mkdir -p {folder})")
    if not os.access(folder, os.W_OK):
        raise RapportError(f"cannot write into {folder}: permission denied")
    if path.exists() and not force:
        raise RapportError(f"{path} already exists; choose a new name, or --force to replace it")
    return path


FAULT_ENV = "RAPPORT_FAULT_POINT"  # fault injection for the kill tests


def fault_point(name: str) -> None:
    """SIGKILL this process at ``name`` when ``$RAPPORT_FAULT_POINT`` names it (tests)."""
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
