"""trl's trainers as peers of the KL-control learners: ``kto``, ``dpo`` and ``sft``.

Design
------
- The rows come from a snapshot of the store through :mod:`learner.trl_data` (the same
  safe prompt encoding as the bot serves with); trl tokenises them, trains from the
  prior's weights and keeps a frozen copy of the prior as the reference model (KTO,
  DPO).
- ``kto`` (Ethayarajh et al. 2024): the voted bot turns, label = liked. ``dpo``
  (Rafailov et al. 2023): two replies to the same context ranked by votes, by the
  combined implicit reward, or by a retry (the kept reply over the one it replaced).
  ``sft``: trl's SFTTrainer on every bot turn (loss on the reply only), e.g.
  ``--platform chitchat`` to adapt the prior to casual chat.
- A run writes what a KL-control run writes (``metrics.jsonl``, ``model/`` with
  ``train_config.json`` and ``training.json``) and registers a new, undeployed version
  whose parent is the prior. trl's own checkpoints are off: the runs are short, and a
  killed run is started again (``--resume`` is for the token-level learners).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from datasets.utils.logging import disable_progress_bar
from transformers import PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, SFTConfig, SFTTrainer

from bot.policy import load_model
from bot.store import Store
from learner.config import TrainConfig
from learner.train import TrainingError
from learner.trl_data import dpo_rows, kto_rows, sft_rows

NO_VOTES = (
    "no voted bot turns to train on; vote with /up /down in `rapport chat` (or 👍/👎 on "
    "Discord), then train again"
)
NO_RETRIES = (
    "no retried replies to train on; ask for another reply with /retry in `rapport chat` "
    "(or 🔁 on Discord), then train again"
)


def training_rows(store: Store, system_prompt: str, config: TrainConfig) -> list[dict]:
    """The rows of a kto, dpo or sft run, or a one-line error saying what is missing."""
    conversations = store.feedback_conversations(config.reward, selection=config.selection())
    where = f" of platform {config.platform!r}" if config.platform else ""
    if config.algo == "kto":
        rows = kto_rows(conversations, system_prompt, config.context_turns, config.pairs_from)
        if not rows:
            raise TrainingError(
                NO_VOTES
                if config.pairs_from == "votes"
                else NO_RETRIES
                if config.pairs_from == "retries"
                else f"no bot turns scored with {config.reward!r}: run `rapport score` first"
            )
    elif config.algo == "dpo":
        rows = dpo_rows(conversations, system_prompt, config.context_turns, config.pairs_from)
        if not rows:
            if config.pairs_from == "retries":
                raise TrainingError(NO_RETRIES)
            how = (
                "with different votes"
                if config.pairs_from == "votes"
                else f"with different {config.reward!r} rewards (run `rapport score` first)"
            )
            raise TrainingError(f"no two replies to the same context{where} {how} to train dpo on")
    else:
        rows = sft_rows(
            conversations,
            system_prompt,
            config.context_turns,
            float("-inf") if config.min_reward is None else config.min_reward,
        )
        if not rows:
            raise TrainingError(f"no bot turns{where} to train sft on: import or chat first")
    return rows


def trainer_args(config: TrainConfig, output_dir: Path) -> dict:
    """The TrainingArguments every trl trainer here shares."""
    return {
        "output_dir": str(output_dir),
        "max_steps": config.steps,
        "per_device_train_batch_size": config.batch_size,
        "learning_rate": config.lr,
        "weight_decay": config.weight_decay,
        "warmup_steps": config.warmup_steps,
        "max_grad_norm": config.grad_clip,
        "seed": config.seed,
        "max_length": config.max_tokens,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "bf16": torch.cuda.is_available(),
        "dataloader_pin_memory": torch.cuda.is_available(),  # pinned pages serve a GPU only
        "disable_tqdm": True,
    }


def kto_weights(labels: list[bool]) -> dict[str, float]:
    """Weights of liked and disliked turns that balance them as the KTO paper advises
    (Ethayarajh et al. 2024, eq. 8: λ_D·n_D / (λ_U·n_U) in [1, 4/3]; here 1).

    >>> kto_weights([True, True, True, False])
    {'desirable_weight': 0.3333333333333333, 'undesirable_weight': 1.0}
    """
    liked = sum(labels)
    disliked = len(labels) - liked
    if not liked or not disliked:
        return {"desirable_weight": 1.0, "undesirable_weight": 1.0}
    return {"desirable_weight": disliked / liked, "undesirable_weight": 1.0}


def make_trainer(config: TrainConfig, model, tokenizer, dataset, output_dir: Path):
    """trl's trainer for ``config.algo`` on ``dataset`` (a ``datasets.Dataset`` of rows
    in the format :mod:`learner.trl_data` writes; trl tokenises it here)."""
    args = trainer_args(config, output_dir)
    if config.algo == "kto":
        # KTO estimates its KL reference point from mismatched pairs within a batch, so
        # it reads batches in order (trl requires it).
        kto = KTOConfig(
            beta=config.beta,
            train_sampling_strategy="sequential",
            **kto_weights(dataset["label"]),
            **args,
        )
        return KTOTrainer(model=model, args=kto, train_dataset=dataset, processing_class=tokenizer)
    if config.algo == "dpo":
        dpo = DPOConfig(beta=config.beta, **args)
        return DPOTrainer(model=model, args=dpo, train_dataset=dataset, processing_class=tokenizer)
    # completion_only_loss: learn the replies, not the users' turns.
    sft = SFTConfig(completion_only_loss=True, packing=False, **args)
    return SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tokenizer)


class ForwardProgress(TrainerCallback):
    """Forwards each logged step to ``progress(step, metrics)`` (the CLI's progress bar)."""

    def __init__(self, progress: Callable[[int, dict], None]) -> None:
        self.progress = progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.progress(state.global_step, dict(logs))


def run_trl_training(
    store: Store,
    prior_path: Path,
    system_prompt: str,
    config: TrainConfig,
    run_dir: Path,
    progress: Callable[[int, dict], None] | None = None,
) -> tuple[torch.nn.Module, object, dict, dict]:
    """Train ``config.algo`` with trl in ``run_dir``; return (trained model, tokenizer,
    final metrics, data metadata). The caller saves and registers the version."""
    rows = training_rows(store, system_prompt, config)
    model, tokenizer = load_model(prior_path)
    disable_progress_bar()  # the CLI shows its own bar, fed by ForwardProgress
    trainer = make_trainer(config, model, tokenizer, Dataset.from_list(rows), run_dir / "trl")
    trainer.remove_callback(PrinterCallback)
    if progress:
        trainer.add_callback(ForwardProgress(progress))
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w", encoding="utf-8") as f:
        for h in history:
            f.write(json.dumps(h, sort_keys=True) + "\n")
    metrics = {k: float(v) for k, v in history[-1].items() if isinstance(v, int | float)}
    metrics["first_loss"] = float(history[0]["loss"])
    metrics["step"] = int(trainer.state.global_step)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    meta = {
        "id": digest,
        "source": str(store.path),
        "rows": len(rows),
        "platform": config.platform,
        "system_prompt": system_prompt,
        "format": config.algo,
    }
    return trainer.model, tokenizer, metrics, meta
