"""The training configuration: one dataclass, help text on every field, saved as JSON
beside every checkpoint and every trained model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from bot.errors import ConfigError
from bot.store_data import Selection

# Ours (learner/train.py): the paper's KL-control family and behaviour cloning (bc).
TOKEN_LEVEL = ("kl_q", "psi", "g", "batch_q", "bc")
# trl's trainers as peers (learner/trl_train.py): KTO on votes, DPO on pairs, SFT.
TRL = ("kto", "dpo", "sft")
ALGORITHMS = TOKEN_LEVEL + TRL
PAIRS_FROM = ("votes", "combined", "retries")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    algo: str = _f(
        "psi",
        "kl_q | psi | g | batch_q | bc | kto | dpo | sft. psi (Psi-learning) is the paper's "
        "best performer; batch_q is the naive baseline that drifts from the prior; bc is our "
        "behaviour cloning on the token-level dataset; kto, dpo and sft are trl's trainers.",
    )
    reward: str = _f(
        "combined",
        "Which stored reward to learn from: combined (the weighted sum) or one signal's "
        "name, e.g. bot_question to study the paper's exploit case.",
    )
    steps: int = _f(200, "Optimiser steps. ~3-4 s each for SmolLM2-135M on 2 CPU cores.")
    batch_size: int = _f(4, "Windows per step (bench: 4 x 128 tokens).")
    max_tokens: int = _f(
        256, "Longest training window in tokens; long conversations are split into windows."
    )
    lr: float = _f(
        1e-5, "AdamW learning rate: small, because Q starts from a pretrained LM's logits."
    )
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(10, "Linear learning-rate warm-up steps.")
    gamma: float = _f(
        0.99,
        "Discount per token: 0.99^30 ~ 0.74 per reply, so the user's reaction to the next "
        "reply still counts.",
    )
    reward_scale: float = _f(
        1.0,
        "c in r/c: the reward is divided by c. Larger c trusts the prior (log p) more; the "
        "combined reward is in z-units, so c = 1 weighs one standard deviation of reward "
        "like one nat of prior log-likelihood.",
    )
    tau: float = _f(
        0.005,
        "Polyak rate of the target network (paper: 0.005). Larger moves the bootstrap "
        "across turns faster but lets the target chase the network it trains.",
    )
    td_lambda: float = _f(
        1.0,
        "lambda of the lambda-return target inside a bot turn: 1 carries the turn's reward "
        "to every word of the turn on the first update (path consistency, exact for psi "
        "and g); 0 is the paper's one-step target, whose credit crawls back about one token "
        "per target refresh.",
    )
    reward_clip: float = _f(
        3.0,
        "The learner's reward is z-scored over the trained turns and clipped to +-this, so "
        "no single rare event (one thumbs-up among thousands of turns) dominates.",
    )
    mc_samples: int = _f(
        1,
        "M Monte-Carlo dropout samples of the target; the minimum is the target (paper: 5). "
        "Dropout perturbs only the learned deviation from the prior, so the pessimism grows "
        "with how far the policy moved; M > 1 costs one more prior forward per step.",
    )
    dropout: float = _f(
        0.1, "Dropout on the target's deviation from the prior, for the Monte-Carlo samples."
    )
    dueling: bool = _f(
        True,
        "KL-control: read Q as log π_θ(a|s) + V_φ(s), a policy and a small value head (a "
        "linear read of the layer-normalised last hidden state), instead of the LM's raw "
        "logit minus the prior's log-partition (--no-dueling), which puts the state's "
        "value in the logits' common offset: Adam moves it by nats a step on SmolLM2, and "
        "it buried the reward (the raw form learned nothing on the bench's logs where this "
        "one raised the question rate: bench/RESULTS.md, thirteenth run). Costs a "
        "log-softmax over the vocabulary at the trained positions; the saved model is the "
        "LM alone.",
    )
    value_lr: float = _f(
        1e-3,
        "The dueling form's value head's learning rate, its own: a linear read of "
        "normalised features, whose step size does not depend on the network's lr. "
        "V_phi(s) takes the state's expected return off every token's TD error, so the "
        "policy is moved only where the reward is decided; at 1e-4 it stayed within 0.03 "
        "of zero in the bench's 16 steps and every word of a turn kept the turn's whole "
        "reward (bench/RESULTS.md, thirteenth run).",
    )
    value_fit: int = _f(
        0,
        "The dueling form: before the first step, fit the value head by ridge regression "
        "on this many training windows (0: it starts at zero), to the returns the "
        "untrained policy earns along the logged turns (fitted policy evaluation, a few "
        "rounds so that the bootstrap across turns carries over). With td_lambda < 1 each "
        "word is then credited with how much it changed the expected return (GAE), not "
        "with the whole turn's reward plus every later word's deviation from the prior. "
        "Costs one forward of the network over those windows; with r = 0 the fit is 0.",
    )
    huber_delta: float = _f(
        1.0,
        "Huber threshold on the TD error; never below reward_clip / reward_scale, so every "
        "reward keeps a gradient proportional to its size.",
    )
    grad_clip: float = _f(1.0, "Clip the gradient norm to this.")
    min_reward: float | None = _f(
        None,
        "bc and sft: clone only bot turns whose reward is at least this. Default: bc clones "
        "the turns above average (reward > 0 in z-units: filtered behaviour cloning), sft "
        "every turn.",
    )
    beta: float = _f(
        0.1,
        "kto and dpo: beta, the strength of the implicit KL penalty to the prior (trl's "
        "default 0.1; the papers use 0.1).",
    )
    pairs_from: str = _f(
        "votes",
        "kto and dpo: where preferences come from: 'votes'; 'combined' for the stored "
        "reward named by --reward (kto: a turn is liked when its reward is above the mean; "
        "dpo: replies to the same context ranked by it); or 'retries' (/retry, 🔁: the "
        "reply kept over the one it replaced; kto: retried replies are not liked, kept "
        "ones are).",
    )
    context_turns: int = _f(
        6,
        "kto, dpo and sft: the turns before a bot turn that form its prompt (the system "
        "prompt is always first); the rest of the context is dropped, oldest first.",
    )
    platform: str = _f(
        "",
        "Learn only from conversations of this platform (e.g. chitchat to adapt the prior "
        "to casual chat, discord for what real users did); empty: all.",
    )
    since: str = _f("", "Learn only from conversations started on or after this date (ISO).")
    until: str = _f("", "Learn only from conversations started on or before this date (ISO).")
    max_conversations: int = _f(
        0,
        "Learn from at most this many conversations, the most recent (0: all). The data "
        "preparation (a prior forward over every window) grows with it: ~5 min for the "
        "7,168 chitchat conversations on 2 CPU cores.",
    )
    kl_budget: float = _f(
        0.0,
        "Stop early once KL(π‖prior) per bot token on the training batch (measured every "
        "log_every steps; use 1 for a learner that moves fast) reaches this; 0: no budget. "
        "Compares learners at equal distance from the prior, e.g. bc held to psi's KL.",
    )
    seed: int = _f(0, "Seed for data order, dropout and initialisation.")
    checkpoint_every: int = _f(50, "Save a resumable checkpoint every N steps.")
    log_every: int = _f(10, "Compute KL to the prior (an extra forward) every N steps.")
    val_fraction: float = _f(0.05, "Share of conversations held out from training.")

    def validate(self) -> None:
        if self.algo not in ALGORITHMS:
            raise ConfigError(
                f"unknown algorithm {self.algo!r}; choose one of {', '.join(ALGORITHMS)}"
            )
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.max_tokens >= 32, "max_tokens must be >= 32"),
            (self.lr > 0, "lr must be > 0"),
            (self.value_lr > 0, "value_lr must be > 0"),
            (0 <= self.gamma <= 1, "gamma must be in [0, 1]"),
            (self.reward_scale > 0, "reward_scale must be > 0"),
            (0 < self.tau <= 1, "tau must be in (0, 1]"),
            (self.mc_samples >= 1, "mc_samples must be >= 1"),
            (0 <= self.td_lambda <= 1, "td_lambda must be in [0, 1]"),
            (self.value_fit >= 0, "value_fit must be >= 0"),
            (self.reward_clip > 0, "reward_clip must be > 0"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (self.checkpoint_every >= 1, "checkpoint_every must be >= 1"),
            (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            (self.beta > 0, "beta must be > 0"),
            (self.pairs_from in PAIRS_FROM, f"pairs_from must be one of {', '.join(PAIRS_FROM)}"),
            (self.context_turns >= 1, "context_turns must be >= 1"),
            (self.max_conversations >= 0, "max_conversations must be >= 0"),
            (self.kl_budget >= 0, "kl_budget must be >= 0 (0: no budget)"),
            (
                not self.kl_budget or self.algo in TOKEN_LEVEL,
                f"kl_budget applies to {', '.join(TOKEN_LEVEL)} (trl's trainers have none)",
            ),
            (self.log_every >= 1, "log_every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for name in ("since", "until"):
            value = getattr(self, name)
            try:
                date.fromisoformat(value) if value else None
            except ValueError:
                raise ConfigError(f"{name} must be a date like 2026-11-30, not {value!r}") from None

    def selection(self) -> Selection:
        """The conversations this run reads."""
        return Selection(self.platform, self.since, self.until, self.max_conversations)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: Path) -> TrainConfig:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        data.setdefault("dueling", False)  # saved before the value head existed
        return cls(**{k: v for k, v in data.items() if k in known})
