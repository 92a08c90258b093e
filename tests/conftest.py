"""Shared fixtures: no test touches a real home folder or a model hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def rapport_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point RAPPORT_HOME at a fresh folder and clear every other RAPPORT_* variable."""
    home = tmp_path / "home"
    home.mkdir()
    for name in list(os.environ):
        if name.startswith("RAPPORT_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RAPPORT_HOME", str(home))
    return home


@pytest.fixture
def store(rapport_home: Path):
    from bot.store import Store

    with Store(rapport_home / "rapport.db") as s:
        yield s


def run_rapport(*args: str, input: str | None = None, env: dict | None = None, timeout=120):
    """Run the real `rapport` command in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
