"""The training loop: offline KL-control (or behaviour cloning) from a prepared dataset.

Reads top to bottom: set up (accelerate places the models: CPU here, CUDA in bf16 when
there is one, several GPUs under ``accelerate launch``), then for each step one batch,
one loss, one optimiser step and a Polyak update of the target network, metrics to
JSONL, and a checkpoint every N steps that holds everything needed to resume exactly
(weights, target weights, optimiser, scheduler, RNG states; the data position is the
step number, because the batch order is a pure function of seed and step). A KL budget
(``config.kl_budget``) ends a run early, once the policy is that far from the prior:
how learners are compared at equal KL.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bot.errors import RapportError
from bot.policy import load_model
from learner import kl_control
from learner.config import TrainConfig
from learner.data import TERMINAL, Dataset, Window, collate
from learner.runs import CHECKPOINT


class TrainingError(RapportError):
    """Training cannot start or go on (no data, a corrupt checkpoint, out of memory)."""


@dataclass
class Models:
    q: torch.nn.Module  # Q, Psi or G network (or the policy, for bc)
    target: torch.nn.Module | None  # Polyak-averaged copy of q
    prior: torch.nn.Module  # frozen: the model the bot was started from
    # the dueling form's V_φ and its Polyak copy (None: the raw form, or bc)
    value: ValueHead | None = None
    target_value: ValueHead | None = None


class ValueHead(torch.nn.Module):
    """V_φ(s) of the dueling form (:mod:`learner.kl_control`): a linear read of the
    layer-normalised last hidden state, which it does not train (detached: the network's
    body learns only through its log-softmax, where a common offset of the logits has no
    gradient). Zero at the start, so Q = log p: the untrained learner is still the
    zero-reward fixed point."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (...)
        normed = F.layer_norm(hidden.detach().float(), hidden.shape[-1:])
        return self.linear(normed).squeeze(-1)


class DuelingHead(torch.nn.Module):
    """Q(s,·) − b(s) = log_softmax ℓ(s,·) + V_φ(s) from hidden states, (..., H) ->
    (..., V): the dueling form's values relative to the prior's log-partition, where the
    raw form has ℓ(s,·) − b(s). ``weight`` is the output layer's."""

    def __init__(self, head: torch.nn.Module, value: ValueHead):
        super().__init__()
        self.head, self.value = head, value

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        policy = torch.log_softmax(self.head(hidden).float(), dim=-1)
        return policy + self.value(hidden).unsqueeze(-1)


def batch_for_step(
    windows: list[Window], step: int, config: TrainConfig, rank: int = 0, world: int = 1
) -> list[Window]:
    """The windows of one step: a seeded permutation per epoch, so resuming at a step
    sees exactly the batches an uninterrupted run would. Under ``accelerate launch`` the
    global batch is ``batch_size`` x processes and each process takes its own slice."""
    size = config.batch_size * world
    per_epoch = max(len(windows) // size, 1)
    epoch, index = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(config.seed + epoch)
    order = torch.randperm(len(windows), generator=generator)
    picked = order[index * size : (index + 1) * size]
    if len(picked) < size:  # fewer windows than a batch: wrap around
        picked = order[torch.arange(size) % len(order)]
    return [windows[int(i)] for i in picked[rank::world]]


def hidden_states(model, batch) -> torch.Tensor:
    """The last hidden states (B, T, H) of a causal LM, without its output layer."""
    return model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state


def bootstrap_positions(mask: torch.Tensor, next_pos: torch.Tensor) -> torch.Tensor:
    """The flat (B*T) positions where a trained action's target bootstraps: V'(s') is
    needed there only."""
    B, T = mask.shape
    flat = torch.arange(B, device=mask.device)[:, None] * T + next_pos
    return flat[mask & (next_pos != TERMINAL)].unique()


def kl_control_loss(models: Models, batch, config: TrainConfig) -> tuple[torch.Tensor, dict]:
    """The Huber TD loss of :mod:`learner.kl_control` on one batch, λ-return targets."""
    algo, mask, next_pos = config.algo, batch["mask"], batch["next_pos"]
    lse, pmax, logp, actions = (batch[k] for k in ("prior_lse", "prior_max", "logp", "actions"))
    B, T = mask.shape
    dueling = models.value is not None
    hidden = hidden_states(models.q, batch)  # (B, T, H)
    q = torch.zeros(mask.shape, device=hidden.device)
    q[mask] = kl_control.q_from_logit(
        _taken_logits(hidden[mask], models.q, models.value, actions[mask], lse[mask]),
        lse[mask],
        logp[mask],
        algo,
    )
    with torch.no_grad():
        target_head = models.target.get_output_embeddings()
        if dueling:
            target_head = DuelingHead(target_head, models.target_value)
        target_hidden = hidden_states(models.target, batch)  # (B, T, H)
        # V'(s') only where a target bootstraps: the next positions of trained actions
        flat_next = bootstrap_positions(mask, next_pos)
        prior_hidden = None
        if config.mc_samples > 1 and config.dropout > 0:
            prior_hidden = hidden_states(models.prior, batch).reshape(B * T, -1)[flat_next]
        next_lse, next_max = lse.reshape(-1)[flat_next], pmax.reshape(-1)[flat_next]
        if dueling:  # the dueling head's values are relative to b(s) already
            next_lse = torch.zeros_like(next_lse)

        def lower_bound(logits, a, b):  # (M, n, V) -> (n,): the minimum over M of V'
            v = kl_control.value_from_logits(logits, next_lse[a:b], next_max[a:b], algo)
            return v.min(dim=0).values

        values = torch.zeros(B * T, device=mask.device)
        values[flat_next] = kl_control.mc_dropout_logits(
            target_hidden.reshape(B * T, -1)[flat_next],
            prior_hidden,
            target_head,
            config.mc_samples,
            config.dropout,
            lower_bound,
        )
        target_q = torch.zeros(mask.shape, device=mask.device)
        target_q[mask] = kl_control.q_from_logit(
            _taken_logits(
                target_hidden[mask], models.target, models.target_value, actions[mask], lse[mask]
            ),
            lse[mask],
            logp[mask],
            algo,
        )
        target = kl_control.lambda_returns(
            kl_control.step_reward(batch["reward"], logp, config.reward_scale, algo),
            kl_control.bootstrap(values.reshape(B, T), next_pos),
            target_q,
            mask,
            next_pos,
            config.gamma,
            config.td_lambda,
        )
    delta = kl_control.huber_delta(config.huber_delta, config.reward_clip, config.reward_scale)
    loss = kl_control.huber_td_loss(q, target, mask, delta)
    metrics = {"td_loss": float(loss.detach()), "mean_q": float(q[mask].detach().mean())}
    if dueling:
        metrics["mean_value"] = float(models.value(hidden[mask]).detach().mean())
    return loss, metrics


def _taken_logits(hidden, model, value, actions, prior_lse) -> torch.Tensor:
    """ℓ(s, a) of the logged actions (N,) in the raw form (one row of the output layer
    per action); in the dueling form log π(a|s) + V_φ(s) + b(s), the same quantity read
    through the log-softmax (the full vocabulary, for its normaliser)."""
    head = model.get_output_embeddings()
    if value is None:
        return kl_control.taken_action_values(hidden, head, actions)
    relative = DuelingHead(head, value)(hidden).gather(-1, actions[:, None]).squeeze(-1)
    return relative + prior_lse


VALUE_FIT_ROUNDS = 4  # fitted evaluation rounds: each carries the return one turn further back
VALUE_FIT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridge penalty per training row, chosen by CV


@torch.no_grad()
def fit_value(models: Models, windows: list[Window], config: TrainConfig, pad_id: int) -> dict:
    """Warm-start the dueling form's value head (``config.value_fit``): V_φ(s) fitted by
    ridge regression to the returns the network as it stands earns along the logged
    turns, its target λ-returns Y minus the policy's part of Q (fitted policy evaluation).
    Each round refits V_φ to targets that bootstrap from the last round's V_φ, so the
    return carries back across turns one turn a round. The ridge penalty is chosen by
    two-fold cross-validation over windows. With r ≡ 0 the targets are 0 at the prior
    (the zero-reward fixed point), so the fit is 0 and nothing moves.

    Why: V_φ starts at zero and its steps are small, so early in training every word of
    a turn carries the turn's whole reward (with λ = 1 plus every later word's
    deviation from the prior, which past the first epoch swamps the reward: RESULTS.md,
    sixteenth run). A fitted V_φ takes the expected return off each word's error, and
    with λ < 1 each word is credited with the change in expected return it made. On the
    learning bench's two draws of logs (λ = 0.9) it explains 37-41% of the return's
    variance, and psi gained more at less KL on both (+0.195 at KL 0.130 against +0.140
    at 0.159; +0.065 at 0.140 against +0.045 at 0.171: RESULTS.md, sixteenth run), yet
    filtered bc at the same KL still gained more on two draws of three; off by default
    until the whole bench has run with it."""
    device = next(models.q.parameters()).device
    algo, H = config.algo, models.value.linear.weight.shape[1]
    zero = ValueHead(H).to(device)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(config.seed))
    picked = [windows[int(i)] for i in order[: config.value_fit]]
    head = DuelingHead(models.q.get_output_embeddings(), zero)
    chunks = []
    for start in range(0, len(picked), config.batch_size):
        batch = {
            k: v.to(device)
            for k, v in collate(picked[start : start + config.batch_size], pad_id).items()
        }
        mask, next_pos = batch["mask"], batch["next_pos"]
        lse, pmax, logp, actions = (batch[k] for k in ("prior_lse", "prior_max", "logp", "actions"))
        B, T = mask.shape
        hidden = hidden_states(models.q, batch)  # (B, T, H)
        q0 = torch.zeros(B, T, device=device)  # Q with V_φ = 0: the policy's part
        q0[mask] = kl_control.q_from_logit(
            _taken_logits(hidden[mask], models.q, zero, actions[mask], lse[mask]),
            lse[mask],
            logp[mask],
            algo,
        )
        flat_next = bootstrap_positions(mask, next_pos)
        next_max = pmax.reshape(-1)[flat_next]
        v0 = torch.zeros(B * T, device=device)
        v0[flat_next] = kl_control.mc_dropout_logits(
            hidden.reshape(B * T, H)[flat_next],
            None,
            head,
            1,
            0.0,
            lambda logits, a, b, m=next_max: kl_control.value_from_logits(
                logits, torch.zeros(b - a, device=device), m[a:b], algo
            )[0],
        )
        feats = F.layer_norm(hidden.float(), (H,))  # what ValueHead reads
        chunks.append(
            {
                "feats": torch.cat([feats, torch.ones(B, T, 1, device=device)], -1),
                "q0": q0,
                "v0": v0.reshape(B, T),
                "step": kl_control.step_reward(batch["reward"], logp, config.reward_scale, algo),
                "mask": mask,
                "next_pos": next_pos,
            }
        )
    x = torch.cat([c["feats"][c["mask"]] for c in chunks])  # (N, H + 1)
    fold = torch.cat([torch.full((int(c["mask"].sum()),), i % 2) for i, c in enumerate(chunks)])
    fold = fold.to(device)
    w, alpha = torch.zeros(H + 1, device=device), None
    for _ in range(VALUE_FIT_ROUNDS):
        ys = []
        for c in chunks:
            values = c["feats"] @ w  # (B, T) V_φ at every position
            y = kl_control.lambda_returns(
                c["step"],
                kl_control.bootstrap(c["v0"] + values, c["next_pos"]),
                c["q0"] + values,
                c["mask"],
                c["next_pos"],
                config.gamma,
                config.td_lambda,
            )
            ys.append((y - c["q0"])[c["mask"]])
        y = torch.cat(ys)
        if alpha is None:  # two-fold cross-validation over windows, once
            alpha = min(VALUE_FIT_ALPHAS, key=lambda a, y=y: _held_out_error(x, y, fold, a))
            alpha = alpha if len(chunks) > 1 else 1.0
        w = _ridge(x, y, torch.ones_like(fold, dtype=torch.bool), alpha)
    fitted = x @ w
    explained = 1.0 - float(((fitted - y) ** 2).mean() / y.var().clamp(min=1e-12))
    for value in (models.value, models.target_value):
        value.linear.weight.copy_(w[:H][None])
        value.linear.bias.copy_(w[H:])
    return {"value_fit_r2": explained, "value_fit_alpha": alpha, "value_fit_rows": len(y)}


def _ridge(x, y, rows, alpha: float) -> torch.Tensor:
    """Ridge regression of y on x over ``rows``; x's last column is the bias, not shrunk;
    the penalty is ``alpha`` per row."""
    penalty = torch.eye(x.shape[1], device=x.device)
    penalty[-1, -1] = 0.0
    a = x[rows].T @ x[rows] + alpha * int(rows.sum()) * penalty
    return torch.linalg.solve(a, x[rows].T @ y[rows])


def _held_out_error(x, y, fold, alpha: float) -> float:
    """Squared error of each fold's rows under the ridge fit on the other fold."""
    return sum(
        float(((x[fold == k] @ _ridge(x, y, fold != k, alpha) - y[fold == k]) ** 2).sum())
        for k in (0, 1)
    )


def bc_keep(batch, config: TrainConfig) -> torch.Tensor:
    """The positions behaviour cloning trains on: filtered BC keeps only the turns whose
    (normalised) reward reaches ``min_reward``; by default the turns above the average,
    reward > 0 in z-units (filtered SFT on well-received turns, as in ReSpect 2025). A
    batch with no such turn trains on nothing, never on the unfiltered turns. Replies
    that left the path (retried, withdrawn by the safety filter) are never imitated,
    whatever ``min_reward``: the user or the filter rejected them."""
    on_path = batch["mask"] & ~batch["withdrawn"][:, None]  # (B, T)
    if config.min_reward is None:
        return on_path & (batch["turn_reward"] > 0)
    return on_path & (batch["turn_reward"] >= config.min_reward)


def bc_loss(models: Models, batch, config: TrainConfig) -> tuple[torch.Tensor, dict]:
    """Behaviour cloning: cross-entropy on the kept logged bot tokens (:func:`bc_keep`)."""
    keep = bc_keep(batch, config)
    hidden = hidden_states(models.q, batch)
    if not keep.any():
        zero = hidden.sum() * 0.0  # no qualifying turn: a zero gradient, not a fallback
        return zero, {"nll": 0.0, "kept_tokens": 0}
    logits = models.q.get_output_embeddings()(hidden[keep]).float()
    loss = F.cross_entropy(logits, batch["actions"][keep])
    return loss, {"nll": float(loss.detach()), "kept_tokens": int(keep.sum())}


def served_logprobs(model, batch, positions: torch.Tensor) -> torch.Tensor:
    """log π(·|s) (N, V) at the masked ``positions`` as every algorithm serves it:
    softmax of the network's logits (see :mod:`learner.kl_control`)."""
    logits = model.get_output_embeddings()(hidden_states(model, batch)[positions]).float()
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def kl_to_prior(models: Models, batch, config: TrainConfig) -> float:
    """KL(π‖p) per bot token on the batch, with π as the algorithm serves it."""
    mask = batch["mask"]
    policy = served_logprobs(models.q, batch, mask)
    prior = served_logprobs(models.prior, batch, mask)
    return float((policy.exp() * (policy - prior)).sum(-1).mean())


def turn_rewards(batch) -> torch.Tensor:
    """The reward of every trained turn in the batch, one value a turn (0 included):
    read at each turn's last trained action, where the next position is not t+1."""
    positions = torch.arange(batch["mask"].shape[1], device=batch["mask"].device)
    ends = batch["mask"] & (batch["next_pos"] != positions + 1)
    return batch["reward"][ends]


def _truncate_metrics(path: Path, step: int) -> list[dict]:
    """On resume, drop the lines of steps after the checkpoint (they are redone); return
    the lines kept."""
    if not path.exists():
        return []
    kept = [json.loads(line) for line in path.read_text().splitlines() if line]
    kept = [m for m in kept if m["step"] <= step]
    path.write_text("".join(json.dumps(m) + "\n" for m in kept))
    return kept


def polyak(target: torch.nn.Module, online: torch.nn.Module, tau: float) -> None:
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters(), strict=True):
            t.lerp_(o.detach(), tau)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path, step: int, models: Models, optimizer, scheduler, accelerator=None
) -> None:
    """Write the checkpoint beside the old one, then swap: a kill leaves one whole."""
    tmp = run_dir / f"{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {
        "step": step,
        "q": (accelerator.unwrap_model(models.q) if accelerator else models.q).state_dict(),
        "target": models.target.state_dict() if models.target is not None else None,
        "value": models.value.state_dict() if models.value is not None else None,
        "target_value": (
            models.target_value.state_dict() if models.target_value is not None else None
        ),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
    }
    torch.save(state, tmp / "state.pt")
    final = run_dir / CHECKPOINT
    old = run_dir / f"{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run_dir: Path, models: Models, optimizer, scheduler) -> int:
    path = run_dir / CHECKPOINT / "state.pt"
    if not path.exists() and (run_dir / f"{CHECKPOINT}.old" / "state.pt").exists():
        path = run_dir / f"{CHECKPOINT}.old" / "state.pt"  # killed mid-swap
    try:
        state = torch.load(path, weights_only=False, map_location="cpu")
        models.q.load_state_dict(state["q"])
        if models.target is not None:
            models.target.load_state_dict(state["target"])
        if models.value is not None:
            models.value.load_state_dict(state["value"])
            models.target_value.load_state_dict(state["target_value"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        return int(state["step"])
    except FileNotFoundError:
        raise TrainingError(f"no checkpoint in {run_dir} to resume from") from None
    except Exception as e:  # a truncated or foreign file: one line, not a traceback
        raise TrainingError(
            f"the checkpoint in {run_dir} is damaged ({type(e).__name__}); "
            "start a new run without --resume"
        ) from None


def accelerator_settings() -> dict:
    """The device and precision a run trains in: the GPU with bf16 mixed precision when
    CUDA is there, else the CPU in fp32. The mixed precision wraps the network's forward
    only; the KL-control losses call its decoder and head directly and stay fp32 on every
    device (bf16 logits leave a TD error the size of a reward: bench/RESULTS.md)."""
    cuda = torch.cuda.is_available()
    return {"cpu": not cuda, "mixed_precision": "bf16" if cuda else "no"}


def train(
    config: TrainConfig,
    dataset: Dataset,
    models: Models,
    run_dir: Path,
    *,
    pad_id: int,
    resume: bool = False,
    progress: Callable[[int, dict], None] | None = None,
    observe: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict:
    """Train ``models.q`` in place for ``config.steps`` steps; return the last metrics.
    ``observe(step, model)``, if given, sees the network after every step (a learning
    curve measured on held-out prompts, in bench/learning_loop.py)."""
    from accelerate import Accelerator  # heavy; loads only when a run trains

    if not dataset.train:
        raise TrainingError("the dataset has no training windows: import or chat, then score")
    accelerator = Accelerator(**accelerator_settings())
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    # fused: one kernel per step over all parameters; torch's CPU default is a loop of
    # ~10 ops per parameter tensor: SmolLM2-135M's AdamW step 0.62 -> 0.10 s here, ~7% of
    # a KL-control step (bench/RESULTS.md)
    groups, value_params = [{"params": list(models.q.parameters())}], []
    if models.value is not None:  # the dueling form's value head, at its own lr
        value_params = list(models.value.to(accelerator.device).parameters())
        groups.append({"params": value_params, "lr": config.value_lr})
    optimizer = torch.optim.AdamW(
        groups,
        lr=config.lr,
        weight_decay=config.weight_decay,
        fused=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(config.warmup_steps, 1))
    )
    models.q, optimizer = accelerator.prepare(models.q, optimizer)
    for frozen in (models.target, models.prior, models.target_value):
        if frozen is not None:
            frozen.to(accelerator.device).requires_grad_(False)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train_config.json").write_text(config.to_json())
    unwrapped = dataclasses.replace(models, q=accelerator.unwrap_model(models.q))
    start = load_checkpoint(run_dir, unwrapped, optimizer, scheduler) if resume else 0
    logged = _truncate_metrics(run_dir / "metrics.jsonl", start)
    loss_fn = bc_loss if config.algo == "bc" else kl_control_loss
    metrics: dict = logged[-1] if logged else {}
    fitted = {}  # the value head's warm start, logged with the first step
    if start == 0 and models.value is not None and config.value_fit:
        fitted = fit_value(unwrapped, dataset.train, config, pad_id)
    if "stopped" in metrics:
        start = config.steps  # it ended on its budget; nothing left to train
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as log:
        for step in range(start, config.steps):
            began = time.perf_counter()
            windows = batch_for_step(
                dataset.train, step, config, accelerator.process_index, accelerator.num_processes
            )
            batch = {k: v.to(accelerator.device) for k, v in collate(windows, pad_id).items()}
            try:
                loss, metrics = loss_fn(models, batch, config)
                accelerator.backward(loss)
            except torch.OutOfMemoryError:
                raise TrainingError(
                    "out of memory: lower --batch-size or --max-tokens, or use a smaller model"
                ) from None
            grad_norm = accelerator.clip_grad_norm_(
                [*models.q.parameters(), *value_params], config.grad_clip
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if models.target is not None:
                polyak(models.target, accelerator.unwrap_model(models.q), config.tau)
            if models.value is not None:
                polyak(models.target_value, models.value, config.tau)
            tokens = int(batch["attention_mask"].sum())
            rewards = turn_rewards(batch)
            metrics |= {
                "step": step + 1,
                "loss": float(loss.detach()),
                "grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "reward": float(rewards.mean()) if rewards.numel() else 0.0,
                "tokens_per_s": tokens / (time.perf_counter() - began),
            }
            if step == 0:
                metrics |= fitted
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                metrics["kl_to_prior"] = kl_to_prior(models, batch, config)
                # the latest measurement, not a mean: a mean of several lags a fast rise
                # (filtered bc gains ~0.05 nats/token a step) and overshoots the budget
                if config.kl_budget and metrics["kl_to_prior"] >= config.kl_budget:
                    metrics["stopped"] = "kl_budget"
            if not math.isfinite(metrics["loss"]):
                raise TrainingError(f"the loss diverged at step {step + 1}; lower --lr")
            if not accelerator.is_main_process:
                continue  # one process logs and checkpoints
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            if progress:
                progress(step + 1, metrics)
            if observe:
                observe(step + 1, accelerator.unwrap_model(models.q))
            last = step + 1 == config.steps or "stopped" in metrics
            if (step + 1) % config.checkpoint_every == 0 or last:
                save_checkpoint(run_dir, step + 1, models, optimizer, scheduler, accelerator)
            if "stopped" in metrics:
                break
    models.q = accelerator.unwrap_model(models.q)
    return metrics


def prepare_models(prior_path: Path, config: TrainConfig) -> Models:
    """Q/Psi/G start from the prior's weights; the target is a copy; the prior is frozen.
    In the dueling form (``config.dueling``) a value head starts at zero, with its copy."""
    q, _ = load_model(prior_path)
    prior = copy.deepcopy(q).requires_grad_(False)
    target = None if config.algo == "bc" else copy.deepcopy(q).requires_grad_(False)
    value = target_value = None
    if config.algo in kl_control.ALGORITHMS and config.dueling:
        value = ValueHead(q.get_output_embeddings().weight.shape[1])
        target_value = copy.deepcopy(value).requires_grad_(False)
    q.train()
    return Models(q, target, prior, value, target_value)


def free_memory_ok(model_params: int) -> None:
    """Refuse a model that cannot fit: q, target, prior and two AdamW moments in fp32."""
    need = model_params * 4 * 5
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if need > available:
        raise TrainingError(
            f"the model needs about {need / 2**30:.1f} GiB to train here and only "
            f"{available / 2**30:.1f} GiB is free; use a smaller model or a GPU"
        )
