"""Training: smoke runs of every algorithm, exact resume, errors, the paper's finding."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from bot.config import Config
from bot.corpora import CHITCHAT_PLATFORM, chitchat_conversations
from bot.policy import Policy, load_model
from bot.prompt import Turn, encode_chat
from bot.store import Store
from learner.config import TOKEN_LEVEL, TrainConfig
from learner.data import add_prior_logprobs, build_dataset, collate
from learner.pipeline import save_trained_model
from learner.train import bc_loss, kl_control_loss, prepare_models, train
from tests.conftest import run_rapport

SYS = "s"
# A peaked prior over single-token replies; the toy reward likes the rare "great".
REPLIES = {"fine": 40, "good": 20, "yes": 12, "why": 8, "maybe": 8, "bad": 6, "cool": 3, "great": 3}


def toy_conversations(n: int, reward, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = [w for w, count in REPLIES.items() for _ in range(count)]
    conversations = []
    for i in range(n):
        turns = []
        for _ in range(2):
            word = rng.choice(pool)
            turns += [
                {"id": 0, "role": "user", "author": "person", "text": "hi", "reward": None},
                {"id": 0, "role": "bot", "author": "person", "text": word, "reward": reward(word)},
            ]
        conversations.append({"id": i, "platform": "toy", "turns": turns})
    return conversations


def toy_dataset(tokenizer, prior, reward, seed=1):
    dataset = build_dataset(toy_conversations(100, reward, seed), tokenizer, SYS, 64, 0.0, "toy")
    add_prior_logprobs(dataset, prior)
    return dataset


def quick(algo: str, **overrides) -> TrainConfig:
    config = TrainConfig(
        algo=algo,
        batch_size=16,
        lr=1e-3,
        warmup_steps=1,
        tau=0.05,
        reward_scale=0.25,
        min_reward=0.5,
        checkpoint_every=10_000,
        log_every=10,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def toy_prior(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model cloned on toy chats: a prior that prefers "fine" and rarely says "great"."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    dataset = toy_dataset(tokenizer, model, lambda w: 0.0, seed=0)
    models = prepare_models(tiny_model_dir, quick("bc", steps=200, lr=3e-3))
    train(
        quick("bc", steps=200, lr=3e-3),
        dataset,
        models,
        tmp_path_factory.mktemp("bc"),
        pad_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("toy-prior")
    models.q.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reply_distribution(model, tokenizer, prior=None) -> torch.Tensor:
    """log π(first reply token | "hi") as served."""
    ids = torch.tensor([encode_chat(tokenizer, SYS, [Turn("user", "hi")])])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
        if prior is not None:  # G-learning serves log p + G
            logits = torch.log_softmax(prior(input_ids=ids).logits[0, -1].float(), -1) + logits
    return torch.log_softmax(logits, -1)


@torch.no_grad()
def dataset_loss(models, dataset, config, pad_id) -> float:
    """The training loss over every window (targets from the current target network),
    without dropout: the Bellman residual (or NLL) the run is meant to shrink."""
    exact = quick(config.algo, mc_samples=1)
    loss_fn = bc_loss if config.algo == "bc" else kl_control_loss
    losses = []
    for start in range(0, len(dataset.train), 16):
        batch = collate(dataset.train[start : start + 16], pad_id)
        losses.append(float(loss_fn(models, batch, exact)[0]))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("algo", TOKEN_LEVEL)
def test_smoke_every_algorithm_learns_moves_weights_and_serves(algo, toy_prior, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(toy_prior)
    prior, _ = load_model(toy_prior)
    dataset = toy_dataset(tokenizer, prior, lambda w: 1.0 if w == "great" else 0.0)
    config = quick(algo, steps=60, mc_samples=3, dropout=0.01)
    models = prepare_models(toy_prior, config)
    before = {k: v.clone() for k, v in models.q.state_dict().items()}
    loss_before = dataset_loss(models, dataset, config, tokenizer.pad_token_id)
    metrics = train(config, dataset, models, tmp_path / "run", pad_id=tokenizer.pad_token_id)
    loss_after = dataset_loss(models, dataset, config, tokenizer.pad_token_id)
    assert loss_after < 0.85 * loss_before, (loss_before, loss_after)

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 61))
    moved = max(float((v - before[k]).abs().max()) for k, v in models.q.state_dict().items())
    assert moved > 1e-4
    assert {"loss", "lr", "reward", "tokens_per_s", "kl_to_prior"} <= set(metrics)

    folder = tmp_path / "model"
    save_trained_model(folder, models.q, tokenizer, config, dataset.meta, metrics, toy_prior)
    serving = Config()
    serving.model.path = str(folder)
    policy = Policy.load(serving.model, serving.generation, seed=0)
    assert policy.stream_tokens(policy.prompt_ids([Turn("user", "hi")])) is not None
    assert isinstance(policy.reply([Turn("user", "hi")]), str)


@pytest.mark.slow
def test_the_papers_finding_batch_q_drifts_while_kl_control_stays_near_the_prior(
    toy_prior, tmp_path
):
    """Every algorithm raises the rewarded reply; batch_q moves far from the prior
    (large KL, low diversity) while the KL-control algorithms stay close. The fixed point
    of KL-control here is π ∝ p·e^(r/c) (p("great") ≈ 0.004 -> ~0.18); batch_q's is
    π ∝ e^(r/c), which ignores the prior. MC-dropout is off (M = 1): on a 32-wide toy
    model its pessimism is larger than the reward (see learner.kl_control)."""
    tokenizer = AutoTokenizer.from_pretrained(toy_prior)
    prior, _ = load_model(toy_prior)
    dataset = toy_dataset(tokenizer, prior, lambda w: 1.0 if w == "great" else 0.0)
    great = tokenizer("great", add_special_tokens=False)["input_ids"][0]
    p = reply_distribution(prior, tokenizer)
    results = {}
    for algo in ("psi", "kl_q", "g", "batch_q"):
        config = quick(algo, steps=500, mc_samples=1)
        models = prepare_models(toy_prior, config)
        train(config, dataset, models, tmp_path / algo, pad_id=tokenizer.pad_token_id)
        pi = reply_distribution(models.q, tokenizer, prior if algo == "g" else None)
        results[algo] = {
            "p_great": float(pi[great].exp()),
            "kl": float((pi.exp() * (pi - p)).sum()),
            "entropy": float(-(pi.exp() * pi).sum()),
        }
    prior_great = float(p[great].exp())
    for algo, r in results.items():
        assert r["p_great"] > 3 * prior_great, (algo, r)
    for algo in ("psi", "kl_q", "g"):
        assert results["batch_q"]["kl"] > 3 * results[algo]["kl"], results
        assert results["batch_q"]["entropy"] < results[algo]["entropy"], results
        assert results[algo]["kl"] < 1.0, results


def scored_store(home: Path, tiny_model_dir: Path) -> None:
    with Store(home / "rapport.db") as store:
        store.import_conversations(CHITCHAT_PLATFORM, list(islice(chitchat_conversations(), 12)))
    result = run_rapport("score")
    assert result.returncode == 0, result.stderr


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
    assert json.loads((folder / "train_config.json").read_text())["algo"] == "psi"
    load_model(folder)


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
    (run / "checkpoint" / "state.pt").write_bytes(b"not a checkpoint")
    result = run_rapport("train", "--resume", run.name, "--steps", "4", timeout=300)
    assert result.returncode == 1
    assert "the checkpoint in" in result.stderr and "is damaged" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigkill_then_resume_ends_with_the_same_weights_as_an_uninterrupted_run(
    rapport_home, tiny_model_dir, tmp_path
):
    scored_store(rapport_home, tiny_model_dir)
    args = [
        "train",
        "--algo",
        "psi",
        "--steps",
        "150",
        "--checkpoint-every",
        "10",
        "--max-tokens",
        "96",
        "--model",
        str(tiny_model_dir),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
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
        "train", "--resume", run.name, "--steps", "150", "--model", str(tiny_model_dir), timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 151))

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
