"""A learned reward model from the votes: an ensemble of Bradley-Terry models with the
mis-click assumption (Christiano et al. 2017; Stiennon et al. 2020), trained with trl's
``RewardTrainer``.

Design
------
- Pairs from votes (:func:`preference_pairs`): two replies to the same user turn with
  different votes; and, because most logged contexts have a single reply, every 👍 reply
  is also paired with a random 👎 reply to another context (each with its own context).
  The input is the reward model's view of a bot turn, :func:`rewards.learned_reward.
  reward_messages` (the user turn answered and the reply), the same at training and at
  scoring time; rows use trl's implicit-prompt preference format with the safe template.
- Mis-click (Christiano et al. 2017, section 2.2.3: "a 10% chance that the human
  responds uniformly at random"): P(chosen ≻ rejected) = (1 − ε)·σ(r_c − r_r) + ε/2 with
  ε = 0.1, so the loss is −log((1 − ε)·σ(Δ) + ε/2) (:func:`misclick_loss`) instead of
  trl's −log σ(Δ). A pair that contradicts the model costs at most −log(ε/2) ≈ 3.0 nats:
  a mistaken vote cannot push the reward without bound. Implemented by overriding
  ``RewardTrainer.compute_loss`` (:class:`MisclickRewardTrainer`), which keeps trl's
  forward pass and metrics and replaces only the loss.
- Ensemble of N members (default 3), each trained from the prior's weights with a new
  scalar head, on a bootstrap resample of the training pairs (sampled with replacement,
  as in the paper) and its own seed. Each member is normalised to mean 0, std 1 over the
  replies it was trained on; the ensemble's reward is the mean, its spread the standard
  deviation across members.
- A held-out share of the voted replies (default 20%) is never trained on; their pairs
  are the test: the report is the ensemble's and each member's ranking accuracy on
  them, and the mean spread.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from datasets.utils.logging import disable_progress_bar
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PrinterCallback
from trl import RewardConfig, RewardTrainer

from bot.config import rapport_home
from bot.errors import RapportError
from bot.store import Store
from learner.trl_data import SAFE_TEMPLATE, vote_score
from rewards.learned_reward import INFO_FILE, TARGETS, RewardEnsemble, reward_messages

# The fewest voted replies whose default 20% hold-out can hold a pair at all (2 replies).
MIN_VOTED = 10


class RewardModelError(RapportError):
    """The reward model cannot be trained (no votes, too few pairs)."""


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class RewardModelConfig:
    members: int = _f(3, "Ensemble size N (Christiano et al. 2017 use 3).")
    misclick: float = _f(
        0.1, "epsilon: the chance a vote is a uniform random click (the paper's 10%)."
    )
    steps: int = _f(100, "Optimiser steps per member.")
    batch_size: int = _f(8, "Pairs per step.")
    lr: float = _f(5e-5, "AdamW learning rate (the head is new, the body pretrained).")
    max_tokens: int = _f(256, "Longest input in tokens; longer pairs are left out (trl).")
    val_fraction: float = _f(0.2, "Share of voted replies held out to measure accuracy.")
    seed: int = _f(0, "Seed of the split, the bootstrap resamples and the members.")
    target: str = _f(
        "votes",
        "What the model learns to predict: 'votes' (pairs of a liked and a disliked reply) "
        "or 'continue' (whether the user went on talking after a bot turn, Chai 2023's "
        "engagement signal: every ended conversation's turns, not only voted ones).",
    )

    def validate(self) -> None:
        checks = [
            (self.members >= 1, "members must be >= 1"),
            (0 <= self.misclick < 1, "misclick must be in [0, 1)"),
            (self.steps >= 1, "steps must be >= 1"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.target in TARGETS, f"target must be one of {', '.join(TARGETS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RewardModelError(message)


def misclick_loss(margin: torch.Tensor, misclick: float) -> torch.Tensor:
    """Mean −log((1 − ε)σ(Δ) + ε/2) over pairs; ``margin`` Δ = r_chosen − r_rejected, (B,).

    Computed in log space: log((1 − ε)σ(Δ) + ε/2) = logaddexp(log(1 − ε) + logσ(Δ),
    log(ε/2)). With ε = 0 it is trl's Bradley-Terry loss −log σ(Δ).
    """
    if misclick == 0:
        return -F.logsigmoid(margin).mean()
    uniform = torch.full_like(margin, math.log(misclick / 2))
    return -torch.logaddexp(math.log1p(-misclick) + F.logsigmoid(margin), uniform).mean()


class MisclickRewardTrainer(RewardTrainer):
    """trl's RewardTrainer with the mis-click likelihood (see module doc)."""

    def __init__(self, *args, misclick: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.misclick = misclick

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # trl's forward pass and metrics (accuracy, margin); only the loss is replaced
        _, outputs = super().compute_loss(model, inputs, return_outputs=True)
        chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
        loss = misclick_loss(chosen - rejected, self.misclick)
        return (loss, outputs) if return_outputs else loss


def continue_score(turn: dict) -> float | None:
    """+1 when the user went on after this bot turn, -1 when the conversation ended
    there; None while that is not known yet (``user_continued`` is scored only once the
    conversation has ended) and for a reply a retry replaced."""
    if turn.get("replaced_by") or turn.get("reward") is None:
        return None
    return 1.0 if turn["reward"] > 0.5 else -1.0


def voted_replies(
    conversations: list[dict], score_of: Callable[[dict], float | None] = vote_score
) -> list[tuple[str, list[dict], float]]:
    """(context key, reward-model messages, score) of every bot turn with a non-zero
    score (default: the mean vote). A turn's context is the conversation's path: a
    reply kept after a retry answers the user turn before the retried one."""
    out = []
    for conversation in conversations:
        previous = None  # the last turn no retry replaced
        for turn in conversation["turns"]:
            score = score_of(turn) if turn["role"] == "bot" else None
            if score:
                prev_user = previous["text"] if previous and previous["role"] == "user" else None
                out.append((prev_user or "", reward_messages(prev_user, turn["text"]), score))
            if not turn.get("replaced_by"):
                previous = turn
    return out


def preference_pairs(replies, seed: int) -> list[dict]:
    """chosen/rejected rows: same-context pairs with different votes, then each liked
    reply against a random disliked reply of another context."""
    rows = []
    for i, (key_a, a, score_a) in enumerate(replies):
        for key_b, b, score_b in replies[i + 1 :]:
            if key_a == key_b and score_a != score_b:
                chosen, rejected = (a, b) if score_a > score_b else (b, a)
                rows.append((chosen, rejected))
    liked = [(k, m) for k, m, s in replies if s > 0]
    disliked = [(k, m) for k, m, s in replies if s < 0]
    rng = random.Random(seed)
    for key, messages in liked if disliked else []:
        other_key, other = rng.choice(disliked)
        if other_key != key:
            rows.append((messages, other))
    return [{"chosen": c, "rejected": r, "chat_template_kwargs": SAFE_TEMPLATE} for c, r in rows]


def split_replies(replies: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out a share of the voted replies (not of the pairs: a held-out pair never
    shares a reply with a training pair)."""
    order = list(range(len(replies)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(replies)))
    return [replies[i] for i in order[n_val:]], [replies[i] for i in order[:n_val]]


def train_member(prior_path: Path, rows: list[dict], config: RewardModelConfig, seed: int, out):
    """One member on ``rows``; saved to ``out``; returns trl's logged history."""
    disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(prior_path)
    torch.manual_seed(seed)  # the new scalar head's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(prior_path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(
        output_dir=str(out / "trl"),
        max_steps=config.steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr,
        warmup_steps=min(10, config.steps // 10),
        max_length=config.max_tokens,
        seed=seed,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=torch.cuda.is_available(),
        dataloader_pin_memory=torch.cuda.is_available(),  # pinned pages serve a GPU only
        disable_tqdm=True,
    )
    trainer = MisclickRewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        misclick=config.misclick,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    trainer.model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return [h for h in trainer.state.log_history if "loss" in h]


def held_out_auc(ensemble: RewardEnsemble, replies: list) -> float:
    """The ensemble's AUC on held-out replies: the chance that a positive (liked, or
    the user continued) scores above a negative, ties counting half. Predicting the
    base rate for every reply scores 0.5."""
    values, _ = ensemble.score([m for _, m, _ in replies])
    pos = [v for v, (_, _, s) in zip(values, replies, strict=True) if s > 0]
    neg = [v for v, (_, _, s) in zip(values, replies, strict=True) if s < 0]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def held_out_report(ensemble: RewardEnsemble, val: list[dict]) -> dict:
    """Ranking accuracy on held-out pairs (ensemble and each member) and the spread."""
    chosen = ensemble.normalised([r["chosen"] for r in val])  # (members, N)
    rejected = ensemble.normalised([r["rejected"] for r in val])
    members = (chosen > rejected).float().mean(1)
    ensemble_right = (chosen.mean(0) > rejected.mean(0)).float().mean()
    spread = torch.cat([chosen, rejected], 1).std(0, unbiased=False)
    return {
        "held_out_pairs": len(val),
        "accuracy": float(ensemble_right),
        "member_accuracy": [float(a) for a in members],
        "spread": float(spread.mean()),
    }


def train_reward_model(
    store: Store,
    prior_path: Path,
    config: RewardModelConfig,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, dict]:
    """Train, normalise and evaluate the ensemble; return (folder, info)."""
    config.validate()
    if config.target == "continue":
        conversations = store.feedback_conversations("user_continued")
        replies = voted_replies(conversations, continue_score)
    else:
        replies = voted_replies(store.feedback_conversations())
    train_replies, val_replies = split_replies(replies, config.val_fraction, config.seed)
    train = preference_pairs(train_replies, config.seed)
    val = preference_pairs(val_replies, config.seed)
    liked = sum(1 for _, _, score in replies if score > 0)
    if (not train or not val) and config.target == "continue":
        raise RewardModelError(
            f"too few scored turns of ended conversations to learn engagement: {liked} "
            f"followed by the user, {len(replies) - liked} ending a conversation; it needs "
            "both, to train on and in the held-out "
            f"{config.val_fraction:.0%}; chat (or `rapport simulate`), then `rapport score`"
        )
    if not train or not val:
        raise RewardModelError(
            f"too few votes to train a reward model: {liked} 👍 and {len(replies) - liked} 👎 "
            f"replies; it needs 👍 and 👎 replies both to train on and in the held-out "
            f"{config.val_fraction:.0%} (at least {MIN_VOTED} voted replies of both kinds; "
            "a useful model, hundreds); vote with /up /down in `rapport chat` or on Discord"
        )
    prefix = "em" if config.target == "continue" else "rm"
    folder = rapport_home() / "reward_models" / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    rng = random.Random(config.seed)
    members, histories = [], []
    for k in range(config.members):
        resample = [train[rng.randrange(len(train))] for _ in train]  # bootstrap
        if progress:
            progress(f"member {k + 1}/{config.members} on {len(resample)} pairs")
        out = folder / f"member-{k}"
        histories.append(train_member(prior_path, resample, config, config.seed + k, out))
        members.append(out.name)
    info = {
        "id": folder.name,
        "target": config.target,
        "base_rate": liked / len(replies),
        "members": members,
        "prior": str(prior_path),
        "max_tokens": config.max_tokens,
        "config": asdict(config),
        "train_pairs": len(train),
        "first_loss": [h[0]["loss"] for h in histories],
        "last_loss": [h[-1]["loss"] for h in histories],
    }
    ensemble = RewardEnsemble(folder, info)  # no normalisation yet: raw outputs
    seen = {json.dumps(m): m for r in train for m in (r["chosen"], r["rejected"])}
    raw = ensemble.raw(list(seen.values()))  # (members, N)
    info["normalisation"] = [(float(r.mean()), float(r.std(unbiased=False))) for r in raw]
    ensemble.stats = [tuple(s) for s in info["normalisation"]]
    info.update(held_out_report(ensemble, val))
    info["auc"] = held_out_auc(ensemble, val_replies)
    # written last: a folder without it is an unfinished run, never loaded for scoring
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    return folder, info
