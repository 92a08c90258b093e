"""`rapport train` and `rapport runs` as a user runs them: end to end in a subprocess,
errors in one line, SIGKILL then resume, pruning runs. (The learners' own behaviour on the
toy reward is in tests/test_learner_train.py.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bot.config import load_config
from bot.corpora import CHITCHAT_PLATFORM, chitchat_conversations
from bot.policy import load_model
from bot.store import Store
from tests.conftest import run_rapport


def scored_store(home: Path, tiny_model_dir: Path) -> None:
    """12 chitchat conversations, scored as `rapport score` scores them (setup for the
    train commands under test: scored in this process, not a second one)."""
    from rewards.score import score_store

    with Store(home / "rapport.db") as store:
        store.import_conversations(CHITCHAT_PLATFORM, list(islice(chitchat_conversations(), 12)))
        assert score_store(store, load_config()).bot_turns > 0


def test_rapport_train_end_to_end_registers_a_new_undeployed_version(rapport_home, tiny_model_dir):
    scored_store(rapport_home, tiny_model_dir)
    result = run_rapport(
        "train",
        "--algo",
        "psi",
        "--steps",
        "3",
        "--max-tokens",
        "96",
        "--dueling",
        "--value-lr",
        "0.003",
        "--model",
        str(tiny_model_dir),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("trained psi-")
    with Store(rapport_home / "rapport.db") as store:
        (model,) = store.models()
        assert model["algorithm"] == "psi" and model["deployed"] == 0
        assert model["parent"] == str(tiny_model_dir)
        assert store.deployed_version() is None
        runs = store.db.execute("SELECT status FROM training_runs").fetchall()
        assert runs == [("done",)]
    folder = Path(model["path"])
    info = json.loads((folder / "training.json").read_text())
    assert len(info["dataset"]["id"]) == 16 and info["metrics"]["step"] == 3
    saved = json.loads((folder / "train_config.json").read_text())
    assert (saved["algo"], saved["dueling"], saved["value_lr"]) == ("psi", True, 0.003)
    load_model(folder)
    # registered: the checkpoint (network, target, optimiser: ~4x the model) is gone, the
    # model stays; the run is listed with its size, and a finished run cannot resume
    run = folder.parent
    assert not (run / "checkpoint").exists() and (folder / "model.safetensors").exists()
    listed = run_rapport("runs")
    assert listed.returncode == 0, listed.stderr
    (line,) = [x for x in listed.stdout.splitlines() if x.startswith(run.name)]
    assert line.split()[1] == "registered" and line.split()[-1] == model["version"]
    again = run_rapport("train", "--resume", run.name, "--steps", "5", timeout=300)
    assert again.returncode == 1 and "finished and registered" in again.stderr
    assert "Traceback" not in again.stderr


def test_runs_prune_frees_checkpoints_and_dead_runs_but_never_a_live_or_registered_one(
    rapport_home, tmp_path
):
    """Four runs: registered with a leftover checkpoint (from before checkpoints were
    dropped), killed (resumable), failed before any checkpoint, and one in progress
    (a process holds its lock)."""
    from learner.runs import hold

    runs = rapport_home / "runs"

    def make(name, checkpoint_bytes, model=False):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text("{}\n")
        if checkpoint_bytes:
            (runs / name / "checkpoint").mkdir()
            (runs / name / "checkpoint" / "state.pt").write_bytes(b"x" * checkpoint_bytes)
        if model:
            (runs / name / "model").mkdir()
            (runs / name / "model" / "model.safetensors").write_bytes(b"w" * 100)
        return runs / name

    done = make("psi-1", 5000, model=True)
    killed = make("psi-2", 7000)
    failed = make("psi-3", 0)
    live = make("psi-4", 3000)
    with Store(rapport_home / "rapport.db") as store:
        store.add_model("psi-1", str(done / "model"), "psi", checksum="c")
    with hold(live):
        listed = run_rapport("runs").stdout
        states = {x.split()[0]: x.split()[1] for x in listed.splitlines()[1:-1]}
        assert states == {
            "psi-1": "registered",
            "psi-2": "resumable",
            "psi-3": "unfinished",
            "psi-4": "in",  # "in progress"
        }
        dry = run_rapport("runs", "prune", "--dry-run")
        assert dry.returncode == 0 and dry.stdout.strip() == "would free 5.0 KB"
        assert (done / "checkpoint").exists() and failed.exists()
        result = run_rapport("runs", "prune")
        assert result.returncode == 0, result.stderr
        assert not (done / "checkpoint").exists() and (done / "model").exists()
        assert not failed.exists() and (killed / "checkpoint" / "state.pt").exists()
        result = run_rapport("runs", "prune", "--resumable")
        assert result.stdout.strip() == "freed 7.0 KB" and not killed.exists()
        assert (live / "checkpoint" / "state.pt").exists()  # never a run in progress


def test_train_errors_are_one_line(rapport_home, tiny_model_dir):
    result = run_rapport("train", "--algo", "dqn", "--model", str(tiny_model_dir))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "rapport: error: unknown algorithm 'dqn'; choose one of "
        "kl_q, psi, g, batch_q, bc, kto, dpo, sft"
    )
    result = run_rapport("train", "--model", str(tiny_model_dir))
    assert (
        result.returncode == 1
        and "no conversations scored with 'combined' to learn from" in result.stderr
    )
    assert "Traceback" not in result.stderr
    scored_store(rapport_home, tiny_model_dir)
    first = run_rapport(
        "train",
        "--steps",
        "2",
        "--max-tokens",
        "96",
        "--checkpoint-every",
        "1",
        "--model",
        str(tiny_model_dir),
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    (run,) = list((rapport_home / "runs").iterdir())
    shutil.rmtree(run / "model")  # as if killed before it finished, with a damaged checkpoint
    (run / "checkpoint").mkdir()
    (run / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    result = run_rapport("train", "--resume", run.name, "--steps", "4", timeout=300)
    assert result.returncode == 1
    assert "the checkpoint in" in result.stderr and "is damaged" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigkill_then_resume_ends_with_the_same_weights_as_an_uninterrupted_run(
    rapport_home, tiny_model_dir, tmp_path
):
    scored_store(rapport_home, tiny_model_dir)
    # Killed at its first checkpoint (step 10), then 50 steps resumed: enough for the
    # restored optimiser, target network, RNG and data order to show in the weights, and
    # slack enough for the kill to land while it still trains.
    args = [
        "train",
        "--algo",
        "psi",
        "--steps",
        "60",
        "--checkpoint-every",
        "10",
        "--max-tokens",
        "96",
        "--model",
        str(tiny_model_dir),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.loop.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while not list((rapport_home / "runs").glob("*/checkpoint/state.pt")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    (run,) = list((rapport_home / "runs").iterdir())
    assert not (run / "model").exists()
    resumed = run_rapport(
        "train", "--resume", run.name, "--steps", "60", "--model", str(tiny_model_dir), timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))

    # the same run, never interrupted, in a copy of the same data
    other = tmp_path / "other-home"
    other.mkdir()
    (other / "rapport.db").write_bytes((rapport_home / "rapport.db").read_bytes())
    (other / "rapport.db.key").write_bytes((rapport_home / "rapport.db.key").read_bytes())
    straight = run_rapport(*args, env={"RAPPORT_HOME": str(other)}, timeout=600)
    assert straight.returncode == 0, straight.stderr
    (run2,) = list((other / "runs").iterdir())
    a = load_file(run / "model" / "model.safetensors")
    b = load_file(run2 / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_a_model_too_big_for_free_memory_is_refused_in_one_line(monkeypatch):
    from learner.train import TrainingError, free_memory_ok

    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_AVPHYS_PAGES": 1000}.get(name, 4096))
    with pytest.raises(TrainingError, match=r"needs about .* GiB to train here and only"):
        free_memory_ok(135_000_000)
    free_memory_ok(1_000)  # a tiny model fits


def test_a_second_reward_on_the_same_logs_reuses_the_priors_statistics(
    rapport_home, tiny_model_dir, monkeypatch
):
    """Training the same logs on a second reward (the learning bench's (a) then (b))
    prepares its data without a prior forward: every window's cached log-probabilities
    are copied from the first reward's dataset, and equal what a forward gives."""
    import copy

    from learner import pipeline
    from learner.config import TrainConfig
    from learner.data import add_prior_logprobs

    scored_store(rapport_home, tiny_model_dir)
    forwards = []

    def counted(path):
        model, tokenizer = load_model(path)
        model.register_forward_hook(lambda *_: forwards.append(1))
        return model, tokenizer

    monkeypatch.setattr(pipeline, "load_model", counted)
    system = load_config().model.system_prompt
    with Store(rapport_home / "rapport.db") as store:
        first = pipeline.prepare_dataset(
            store, tiny_model_dir, system, TrainConfig(reward="bot_question", max_tokens=96)
        )
        assert forwards, "the first reward's preparation runs the prior"
        forwards.clear()
        second = pipeline.prepare_dataset(
            store, tiny_model_dir, system, TrainConfig(reward="combined", max_tokens=96)
        )
    assert forwards == []
    assert second.meta["id"] != first.meta["id"]  # another dataset: other rewards
    assert [w.reward for w in second.train] != [w.reward for w in first.train]
    fresh = copy.deepcopy(second)
    for w in fresh.train + fresh.val:
        w.logp, w.prior_lse, w.prior_max = [], [], []
    add_prior_logprobs(fresh, load_model(tiny_model_dir)[0])
    for reused, computed in zip(second.train + second.val, fresh.train + fresh.val, strict=True):
        assert reused.logp == pytest.approx(computed.logp, abs=1e-5)
        assert reused.prior_lse == pytest.approx(computed.prior_lse, abs=1e-5)
        assert reused.prior_max == pytest.approx(computed.prior_max, abs=1e-5)
