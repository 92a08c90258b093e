"""Training on a toy reward: every algorithm, zero-reward controls, credit, sign, scale, serving."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from bot.config import Config
from bot.policy import Policy, load_model
from bot.prompt import Turn, encode_chat
from learner.config import TOKEN_LEVEL, TrainConfig
from learner.data import add_prior_logprobs, build_dataset, collate
from learner.pipeline import save_trained_model
from learner.train import bc_loss, kl_control_loss, prepare_models, train

SYS = "s"
# A peaked prior over single-token replies; the toy reward likes the rare "great".
REPLIES = {"fine": 40, "good": 20, "yes": 12, "why": 8, "maybe": 8, "bad": 6, "cool": 3, "great": 3}


def toy_conversations(n: int, reward, seed: int, tail: str = "") -> list[dict]:
    rng = random.Random(seed)
    pool = [w for w, count in REPLIES.items() for _ in range(count)]
    conversations = []
    for i in range(n):
        turns = []
        for _ in range(2):
            word = rng.choice(pool)
            turns += [
                {"id": 0, "role": "user", "author": "person", "text": "hi", "reward": None},
                {
                    "id": 0,
                    "role": "bot",
                    "author": "person",
                    "text": word + tail,
                    "reward": reward(word),
                },
            ]
        conversations.append({"id": i, "platform": "toy", "turns": turns})
    return conversations


def toy_dataset(tokenizer, prior, reward, seed=1, tail=""):
    conversations = toy_conversations(100, reward, seed, tail)
    dataset = build_dataset(conversations, tokenizer, SYS, 64, 0.0, "toy")
    add_prior_logprobs(dataset, prior)
    return dataset


def quick(algo: str, **overrides) -> TrainConfig:
    """The defaults users run, sized for the toy: a bigger learning rate and batch for a
    32-wide model, a faster target, fewer steps. Every learner knob keeps its default."""
    config = TrainConfig(
        algo=algo,
        steps=100,
        batch_size=16,
        lr=1e-3,
        warmup_steps=1,
        tau=0.05,
        reward_scale=0.25,
        checkpoint_every=10_000,
        log_every=25,  # the KL metric's extra forwards: 4 a run, the last at the end
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="module")
def toy_prior(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model cloned on toy chats: a prior that prefers "fine" and rarely says "great"."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model, _ = load_model(tiny_model_dir)
    dataset = toy_dataset(tokenizer, model, lambda w: 0.0, seed=0, tail=TAIL)
    config = quick("bc", steps=250, lr=3e-3, min_reward=float("-inf"))
    models = prepare_models(tiny_model_dir, config)
    train(config, dataset, models, tmp_path_factory.mktemp("bc"), pad_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("toy-prior")
    models.q.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# The toy replies are one word and a fixed tail: the first token decides the reward and
# the end of turn, where the reward lands, is 7 tokens later.
TAIL = " and that is all"


def first_token_logprobs(model, tokenizer) -> torch.Tensor:
    """log π(first reply token | "hi"), softmax of the logits: how every algorithm serves."""
    ids = torch.tensor([encode_chat(tokenizer, SYS, [Turn("user", "hi")])])
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)


def likes_great(word: str) -> float:
    return 1.0 if word == "great" else 0.0


@functools.cache
def shared_toy_dataset(prior_dir: Path, rewards: tuple[float, ...]):
    """The toy dataset under the prior in ``prior_dir`` for the reward that gives each
    reply of REPLIES its value in ``rewards``: tokenised and scored by the prior once
    (about 2 s), not once a run; training only reads it."""
    tokenizer = AutoTokenizer.from_pretrained(prior_dir)
    prior, _ = load_model(prior_dir)
    by_word = dict(zip(REPLIES, rewards, strict=True))
    return toy_dataset(tokenizer, prior, by_word.__getitem__, tail=TAIL)


def run(toy_prior, tmp_path, algo, reward=likes_great, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(toy_prior)
    prior, _ = load_model(toy_prior)
    dataset = shared_toy_dataset(toy_prior, tuple(reward(w) for w in REPLIES))
    config = quick(algo, **overrides)
    models = prepare_models(toy_prior, config)
    metrics = train(config, dataset, models, tmp_path, pad_id=tokenizer.pad_token_id)
    great = tokenizer("great", add_special_tokens=False)["input_ids"][0]
    p, pi = first_token_logprobs(prior, tokenizer), first_token_logprobs(models.q, tokenizer)
    return {
        "models": models,
        "metrics": metrics,
        "dataset": dataset,
        "config": config,
        "tokenizer": tokenizer,
        "p_great": float(pi[great].exp()),
        "prior_great": float(p[great].exp()),
        "kl": float((pi.exp() * (pi - p)).sum()),
    }


@pytest.fixture(scope="module")
def rewarded(toy_prior, tmp_path_factory) -> dict:
    """Every token-level algorithm trained once on the toy reward that likes "great"."""
    return {algo: run(toy_prior, tmp_path_factory.mktemp(algo), algo) for algo in TOKEN_LEVEL}


@torch.no_grad()
def dataset_loss(models, dataset, config, pad_id) -> float:
    """The training loss over every window (targets from the current target network):
    the Bellman residual (or NLL) the run is meant to shrink."""
    loss_fn = bc_loss if config.algo == "bc" else kl_control_loss
    losses = []
    for start in range(0, len(dataset.train), 16):
        batch = collate(dataset.train[start : start + 16], pad_id)
        losses.append(float(loss_fn(models, batch, config)[0]))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("algo", TOKEN_LEVEL)
def test_every_algorithm_raises_the_rewarded_reply_and_the_metrics_say_so(
    algo, rewarded, toy_prior
):
    r = rewarded[algo]
    assert r["p_great"] > 3 * r["prior_great"], r
    metrics = r["metrics"]
    assert metrics["step"] == 100 and metrics["kl_to_prior"] > 0.01
    # the reward metric is the mean over every trained turn, zeros included ("great" is
    # about 3% of the toy replies), not the mean of the nonzero ones (which reads 1.0)
    assert 0 <= metrics["reward"] < 0.5
    if algo != "bc":
        fresh = prepare_models(toy_prior, r["config"])
        pad = r["tokenizer"].pad_token_id
        before = dataset_loss(fresh, r["dataset"], r["config"], pad)
        after = dataset_loss(r["models"], r["dataset"], r["config"], pad)
        assert after < before, (before, after)


def test_psi_and_g_are_the_same_learner_and_batch_q_gains_less_per_nat_of_kl(rewarded):
    """g is psi re-parameterised (learner.kl_control): the same policy, step for step.
    batch_q, with no prior in its target, moves further from the prior than the
    KL-control learners and gains less of the rewarded reply per nat of KL than psi (its
    drift at zero reward, the paper's finding, is in the zero-reward control below). In
    the dueling form, the default, it may raise the word further in absolute terms (0.31
    at KL 1.27 vs psi's 0.12 at 0.31 on an AMD EPYC): the raw form's offset had held every
    learner back, and the paper's claim is per nat of KL, not absolute."""
    psi, g, batch_q = rewarded["psi"], rewarded["g"], rewarded["batch_q"]
    summary = {a: (round(r["p_great"], 4), round(r["kl"], 4)) for a, r in rewarded.items()}
    # Equal in exact arithmetic, not in floats: the two parameterisations round
    # differently and the toy's many steps compound it. On an AMD EPYC they ended within
    # 1%; on an Intel Xeon (AVX512, no BF16) with one torch thread (as `make test`'s
    # workers run) 3% apart in p_great and 7% in KL, the same before and after the
    # changes of 2026-12-01. kl_q (+18% KL) and batch_q (-45% p_great) stay outside 10%.
    assert g["p_great"] == pytest.approx(psi["p_great"], rel=0.1), summary
    assert g["kl"] == pytest.approx(psi["kl"], rel=0.1, abs=1e-4), summary
    for algo in ("psi", "kl_q"):
        assert batch_q["kl"] > rewarded[algo]["kl"], summary

    def gain_per_kl(r):
        return (r["p_great"] - r["prior_great"]) / r["kl"]

    assert gain_per_kl(batch_q) < gain_per_kl(psi), summary


@pytest.mark.parametrize(
    "algo,mc_samples,dueling",
    [(algo, 1, True) for algo in TOKEN_LEVEL]
    + [("psi", 5, True)]
    + [(algo, 1, False) for algo in TOKEN_LEVEL if algo != "bc"],
)
def test_zero_reward_control_every_kl_control_learner_stays_at_the_prior(
    algo, mc_samples, dueling, toy_prior, tmp_path
):
    """With r ≡ 0 the served policy stays the prior (KL < 0.01 nats/token) at the
    default M = 1, in the dueling form (the default: its value head starts at zero) and
    in the raw form; batch_q, which has no prior to sit at, drifts. With the paper's M = 5
    dropout samples (on psi: the dropout acts on the target network's hidden states the
    same way for every algorithm) the fixed point holds only up to float noise (TD loss
    ~4e-12 at the first step), which Adam turns into steps of the full lr; once the
    network has moved, the minimum over samples of its deviation from the prior is a
    pessimism that does not average out: on this toy, KL ~0.03 after 100 steps at lr
    1e-3, bounded here at 0.05."""
    r = run(toy_prior, tmp_path, algo, reward=lambda w: 0.0, mc_samples=mc_samples, dueling=dueling)
    bound = 0.01 if mc_samples == 1 else 0.05
    if algo == "batch_q":
        assert r["kl"] > 0.05, r["kl"]
    else:
        assert r["kl"] < bound, r["kl"]
        assert r["metrics"]["kl_to_prior"] < bound


def test_the_value_head_learns_at_its_own_rate_and_the_raw_form_has_none(toy_prior, tmp_path):
    """The dueling form's value head (learner.train.ValueHead) steps at its own
    value_lr while the network steps at lr (Adam's first step moves a parameter by its
    learning rate); the raw form trains the network alone; neither saves a value head
    into the served model (the policy is the network's softmax)."""
    import copy

    moved = {}
    for scale in (1.0, 10.0):
        config = quick("psi", steps=1, dueling=True)
        config.value_lr = config.lr * scale
        models = prepare_models(toy_prior, config)
        body = copy.deepcopy(models.q.get_output_embeddings().weight)
        dataset = shared_toy_dataset(toy_prior, tuple(likes_great(w) for w in REPLIES))
        train(config, dataset, models, tmp_path / str(scale), pad_id=0)
        head = float(models.value.linear.weight.detach().abs().max())
        network = float((models.q.get_output_embeddings().weight - body).abs().max())
        # the head starts at zero; the network's weights also decay (AdamW), by ~1%
        moved[scale] = (head / config.value_lr, network / config.lr)
        assert models.target_value is not None
        assert not any("value" in name for name, _ in models.q.named_parameters())
    for head_step, network_step in moved.values():
        assert head_step == pytest.approx(1.0, rel=1e-3), moved
        assert network_step == pytest.approx(1.0, rel=0.03), moved
    raw = prepare_models(toy_prior, quick("psi", dueling=False))
    assert raw.value is None and raw.target_value is None


def with_retries(conversations: list[dict], retried: str, reward: float) -> list[dict]:
    """Every fourth toy conversation gets a reply ``retried + TAIL`` the user retried
    before its first kept reply, scored ``reward``: off the path, as the store logs it."""
    for c in conversations[::4]:
        replaced = {"id": 0, "role": "bot", "author": "model", "text": retried + TAIL}
        c["turns"].insert(1, replaced | {"reward": reward, "replaced_by": 1})
    return conversations


def first_token_probability(model, tokenizer, word: str) -> float:
    token = tokenizer(word, add_special_tokens=False)["input_ids"][0]
    return float(first_token_logprobs(model, tokenizer)[token].exp())


def test_a_retried_reply_becomes_less_likely_and_a_zero_reward_control_stays(toy_prior, tmp_path):
    """The retried reply ("why ...", reward -1 where every kept reply scores 0) is off
    the conversation's path, yet the learner lowers its probability against the prior;
    with the retry scored 0 the same logs leave the policy at the prior. psi stands for g
    (the same learner, step for step: test_psi_and_g_are_the_same_learner...). (kl_q is
    left out: on this toy its hard max lets unlogged tokens take over, KL ~5; see README.)"""
    algo = "psi"
    tokenizer = AutoTokenizer.from_pretrained(toy_prior)
    prior, _ = load_model(toy_prior)
    prior_why = first_token_probability(prior, tokenizer, "why")
    moved = {}
    for reward in (-1.0, 0.0):
        logs = with_retries(toy_conversations(100, lambda w: 0.0, 1, TAIL), "why", reward)
        dataset = build_dataset(logs, tokenizer, SYS, 64, 0.0, "toy")
        assert dataset.meta["withdrawn_windows"] == 25
        add_prior_logprobs(dataset, prior)
        config = quick(algo)
        models = prepare_models(toy_prior, config)
        train(config, dataset, models, tmp_path / str(reward), pad_id=tokenizer.pad_token_id)
        pi, p = (first_token_logprobs(m, tokenizer) for m in (models.q, prior))
        moved[reward] = {
            "p_why": first_token_probability(models.q, tokenizer, "why"),
            "kl": float((pi.exp() * (pi - p)).sum()),
        }
    assert moved[-1.0]["p_why"] < 0.85 * prior_why, (prior_why, moved)
    assert moved[-1.0]["kl"] < 0.2, moved  # moved, not collapsed
    assert moved[0.0]["p_why"] == pytest.approx(prior_why, rel=0.03), (prior_why, moved)
    assert moved[0.0]["kl"] < 0.01, moved


def test_credit_reaches_the_first_word_of_a_reply_rewarded_at_its_end(
    rewarded, toy_prior, tmp_path
):
    """The reward lands on the end of turn 7 tokens after the word that earned it; the
    default λ-return carries it there within the run's 100 steps, while the paper's
    one-step target (λ = 0) has barely moved it in as many."""
    full = rewarded["psi"]
    one_step = run(toy_prior, tmp_path / "one", "psi", td_lambda=0.0)
    assert full["p_great"] > 3 * full["prior_great"], full["p_great"]
    gain = full["p_great"] - full["prior_great"]
    assert one_step["p_great"] - one_step["prior_great"] < gain / 3, (one_step, full)


def test_a_negated_reward_moves_the_other_way_and_a_larger_scale_further(
    toy_prior, tmp_path, rewarded
):
    base = rewarded["psi"]
    negated = run(toy_prior, tmp_path / "neg", "psi", reward=lambda w: -likes_great(w))
    assert negated["p_great"] < base["prior_great"] < base["p_great"]
    stronger = run(toy_prior, tmp_path / "strong", "psi", reward_scale=0.0625)
    assert stronger["p_great"] > base["p_great"] and stronger["kl"] > base["kl"]


def test_a_kl_budget_stops_a_run_once_it_is_that_far_from_the_prior(rewarded, toy_prior, tmp_path):
    """How learners are compared at equal KL: bc held to a third of the KL its full run
    reached stops early, on the budget, nearer the prior; resuming it trains no further."""
    full = rewarded["bc"]
    budget = full["metrics"]["kl_to_prior"] / 3
    held = run(toy_prior, tmp_path, "bc", kl_budget=budget, log_every=1)
    metrics = held["metrics"]
    assert metrics["stopped"] == "kl_budget" and 1 < metrics["step"] < 100, metrics
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == metrics["step"] and len(logged) == metrics["step"]
    # it stops at the first measurement on or over the budget, and not before
    assert logged[-1]["kl_to_prior"] >= budget, logged[-2:]
    assert all(m["kl_to_prior"] < budget for m in logged[:-1]), logged[-2:]
    assert held["kl"] < full["kl"] and held["p_great"] < full["p_great"]
    weights = {k: v.clone() for k, v in held["models"].q.state_dict().items()}
    again = train(
        held["config"],
        held["dataset"],
        held["models"],
        tmp_path,
        pad_id=held["tokenizer"].pad_token_id,
        resume=True,
    )
    assert again["step"] == metrics["step"] and again["stopped"] == "kl_budget"
    assert all(torch.equal(v, held["models"].q.state_dict()[k]) for k, v in weights.items())


@pytest.mark.parametrize("algo", TOKEN_LEVEL)
def test_serving_samples_from_the_distribution_the_learner_trained(algo, rewarded, tmp_path):
    """What Policy.load serves is what the learner meant (softmax of the saved network's
    logits, no prior needed), and rapport eval's KL equals the training KL metric on
    the same contexts."""
    from learner.evaluate import kl_per_tokens
    from learner.train import kl_to_prior

    r = rewarded[algo]
    tokenizer, models = r["tokenizer"], r["models"]
    folder = tmp_path / "model"
    save_trained_model(folder, models.q, tokenizer, r["config"], {}, r["metrics"], "prior")
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == []  # one plain folder
    serving = Config()
    serving.model.path = str(folder)
    serving.model.serve_precision = "fp32"
    policy = Policy.load(serving.model, serving.generation, seed=0)
    served = first_token_logprobs(policy.model, tokenizer)
    assert torch.allclose(served, first_token_logprobs(models.q, tokenizer), atol=1e-5)

    windows = r["dataset"].train[:8]
    batch = collate(windows, tokenizer.pad_token_id)
    trained_kl = kl_to_prior(models, batch, r["config"])
    positions = [[t for t, m in enumerate(w.mask) if m] for w in windows]
    per_window = kl_per_tokens(
        policy.model, models.prior, [w.input_ids for w in windows], positions
    )
    counts = [len(p) for p in positions]
    eval_kl = sum(k * n for k, n in zip(per_window, counts, strict=True)) / sum(counts)
    assert eval_kl == pytest.approx(trained_kl, rel=1e-3, abs=1e-6)
    assert trained_kl > 0.01


def test_on_cuda_a_run_trains_in_bf16_mixed_precision_and_trl_peers_in_bf16(monkeypatch):
    """The device choice a GPU gets, read with CUDA faked present: the accelerator
    trains on the GPU with bf16 mixed precision, trl's trainers get bf16; without CUDA,
    the CPU in fp32."""
    from learner.train import accelerator_settings
    from learner.trl_train import trainer_args

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert accelerator_settings() == {"cpu": False, "mixed_precision": "bf16"}
    assert trainer_args(TrainConfig(algo="kto"), Path("out"))["bf16"] is True
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert accelerator_settings() == {"cpu": True, "mixed_precision": "no"}
    assert trainer_args(TrainConfig(algo="kto"), Path("out"))["bf16"] is False


def test_the_kl_control_losses_stay_fp32_under_the_gpus_bf16_mixed_precision(
    toy_prior, tmp_path, monkeypatch
):
    """As far as a CPU allows: a psi run under the accelerator a GPU gets (bf16
    autocast, here on the CPU) takes the same steps as an fp32 run, to fp32 rounding,
    because the losses never go through the autocast forward (bf16 logits would leave
    a TD error the size of a reward). The autocast is really on: the wrapped network's
    own forward returns bf16-rounded logits (handed back as fp32 by accelerate)."""
    from accelerate.state import AcceleratorState

    import learner.train

    fp32 = run(toy_prior, tmp_path / "fp32", "psi", steps=5)
    monkeypatch.setattr(
        learner.train, "accelerator_settings", lambda: {"cpu": True, "mixed_precision": "bf16"}
    )
    AcceleratorState._reset_state(reset_partial_state=True)  # a process has one precision
    try:
        mixed = run(toy_prior, tmp_path / "bf16", "psi", steps=5)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)

    def bf16_rounded(model) -> bool:
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits.detach()
        return torch.equal(logits, logits.bfloat16().float())

    assert bf16_rounded(mixed["models"].q) and not bf16_rounded(fp32["models"].q)
    assert mixed["metrics"]["td_loss"] == pytest.approx(fp32["metrics"]["td_loss"], rel=1e-4)
    for a, b in zip(fp32["models"].q.parameters(), mixed["models"].q.parameters(), strict=True):
        assert b.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5)


def test_the_value_fit_predicts_the_turns_return_and_is_zero_without_reward(toy_prior):
    """The dueling value head's warm start (``value_fit``): fitted to the returns of the
    logged turns, V_φ at the state right after the rewarded word is well above its value
    after any other, 5 tokens before the end of turn where the reward lands; with r ≡ 0
    the fit is zero up to float rounding (the cached prior log-probs against a fresh
    forward) and the target head is the same as the online one."""
    from learner.train import fit_value, hidden_states

    tokenizer = AutoTokenizer.from_pretrained(toy_prior)

    def value_after(models, word: str) -> float:
        ids = encode_chat(tokenizer, SYS, [Turn("user", "hi")])
        ids = ids + tokenizer(word, add_special_tokens=False)["input_ids"]
        batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))}
        with torch.no_grad():
            return float(models.value(hidden_states(models.q, batch)[0, -1]))

    values, fits = {}, {}  # "fine", 40% of the replies: both folds of the fit see it
    for name, reward in (("fine", lambda w: float(w == "fine")), ("zero", lambda w: 0.0)):
        dataset = shared_toy_dataset(toy_prior, tuple(reward(w) for w in REPLIES))
        config = quick("psi", value_fit=64)
        models = prepare_models(toy_prior, config)
        fits[name] = fit_value(models, dataset.train, config, tokenizer.pad_token_id)
        values[name] = {w: value_after(models, w) for w in REPLIES}
        assert torch.equal(models.value.linear.weight, models.target_value.linear.weight)
        assert torch.equal(models.value.linear.bias, models.target_value.linear.bias)
    assert max(abs(v) for v in values["zero"].values()) < 0.01, values["zero"]
    fine = values["fine"]
    assert fine["fine"] > max(v for w, v in fine.items() if w != "fine") + 1.0, (fine, fits)
    # Explained variance: the first word's state cannot know the word (1 row in 6), and
    # this toy prior, cloned on replies whose tail is always the same, barely keeps the
    # word in its state along the tail (SmolLM2's states do); a fit to noise explains 0.
    assert fits["fine"]["value_fit_r2"] > 0.1, fits["fine"]


@pytest.mark.parametrize("reward", ["great", "zero"])
def test_with_a_fitted_value_the_learner_still_learns_and_still_rests_at_zero_reward(
    reward, toy_prior, tmp_path
):
    """The value fit changes no fixed point: with it, psi still raises the rewarded word
    (at the default λ = 1), and with r ≡ 0 it stays at the prior, also at λ = 0.5 where
    the fitted value is what the short return bootstraps from. (On this toy a short λ
    does not carry the reward back to the first word: the toy prior's states along the
    fixed tail barely keep the word, so V_φ cannot see it; see the test above.)"""
    if reward == "great":
        r = run(toy_prior, tmp_path, "psi", value_fit=64)
        assert r["p_great"] > 3 * r["prior_great"], r["p_great"]
        assert "value_fit_r2" not in r["metrics"]  # logged with the first step only
        first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
        assert first["value_fit_rows"] > 0 and first["step"] == 1
    else:
        r = run(toy_prior, tmp_path, "psi", reward=lambda w: 0.0, value_fit=64, td_lambda=0.5)
        assert r["kl"] < 0.01, r["kl"]
