"""learned_reward: a reward model fitted to the votes, scoring every bot turn.

Scores: the bot turn, seen with the user turn it answers (the reward model's input is
those two chat messages, rendered with the safe chat template). Formula: the mean over
an ensemble of N reward models of each member's normalised output
(r_k − mean_k) / std_k, with each member's statistics fitted on the turns it was trained
on (Christiano et al. 2017, "Deep RL from Human Preferences", section 2.2.3: an ensemble,
each member normalised, then averaged). The members' spread (standard deviation across
members) says where the ensemble is unsure. Trained by :mod:`learner.reward_model`.

Unlike the other signals it exists only once a reward model has been trained (``rapport
reward-model train``): :func:`latest_reward_model` finds it, and ``rapport score`` then
scores ``learned_reward`` beside the others (scored like them, never part of
``combined``; learn from it with ``rapport train --reward learned_reward``). A model
trained on whether the user continued after a turn (``--target continue``) scores
``learned_engagement`` the same way.

>>> reward_messages("hi", "hello!")
[{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello!'}]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from bot.errors import RapportError
from bot.processes import cpu_has_bf16
from rewards.context import Context

NAME = "learned_reward"
INFO_FILE = "reward_model.json"
BATCH_SIZE = 16


def reward_messages(prev_user: str | None, bot: str) -> list[dict]:
    """The reward model's input: the user turn answered (if any) and the bot turn."""
    messages = [{"role": "user", "content": prev_user}] if prev_user else []
    return messages + [{"role": "assistant", "content": bot}]


# What a reward model was trained to predict -> the signal it scores: the votes
# (learned_reward), or whether the user went on talking after the turn (Chai 2023's
# engagement signal: learned_engagement).
TARGETS = {"votes": NAME, "continue": "learned_engagement"}


def model_target(folder: Path) -> str:
    """The target of the reward model in ``folder`` (models before targets: votes)."""
    return json.loads((Path(folder) / INFO_FILE).read_text()).get("target", "votes")


def latest_reward_model(folder: Path, target: str = "votes") -> Path | None:
    """The newest complete reward model of ``target`` under ``folder`` (its info file is
    written last)."""
    done = sorted(folder.glob(f"*/{INFO_FILE}"), key=lambda p: p.stat().st_mtime)
    done = [p.parent for p in done if model_target(p.parent) == target]
    return done[-1] if done else None


def ranking_dtype() -> torch.dtype:
    """The members' weights when best-of-N ranks candidates while a person waits: bf16
    where the CPU computes it natively (AVX512-BF16 or AMX), fp32 elsewhere (emulated
    bf16 is slower than fp32). A member's forward over four candidates took 551 ms in
    bf16 vs 1,000 ms in fp32 on the development machine's AMD EPYC (bench/RESULTS.md);
    its z-scores move by bf16's rounding, far less than the candidates differ. Scoring
    the logs for the learner stays fp32."""
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


class RewardEnsemble:
    """The trained members, loaded once; scores batches of chat messages."""

    def __init__(
        self, folder: Path, info: dict | None = None, dtype: torch.dtype = torch.float32
    ) -> None:
        """``info`` is the reward model's info file, read from ``folder`` if not given;
        ``dtype`` the members' weights (scoring the logs: fp32; ranking: see
        :func:`ranking_dtype`)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.folder = Path(folder)
        self.info = info or json.loads((self.folder / INFO_FILE).read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder / self.info["members"][0])
        self.members = [
            AutoModelForSequenceClassification.from_pretrained(self.folder / m, dtype=dtype).eval()
            for m in self.info["members"]
        ]
        self.stats = [tuple(s) for s in self.info.get("normalisation", [])]

    @property
    def version(self) -> str:
        """Names the model in the scorer version: a new model means rescoring."""
        return self.info["id"]

    @torch.no_grad()
    def raw(self, conversations: list[list[dict]]) -> torch.Tensor:
        """Every member's raw output for every conversation: (members, N)."""
        out = torch.zeros(len(self.members), len(conversations))
        for start in range(0, len(conversations), BATCH_SIZE):
            chunk = conversations[start : start + BATCH_SIZE]
            ids = [
                self.tokenizer.apply_chat_template(
                    c, tokenize=True, return_dict=True, sanitize_control_tokens=True
                )["input_ids"][-self.info["max_tokens"] :]
                for c in chunk
            ]
            pad = self.members[0].config.pad_token_id
            width = max(len(x) for x in ids)
            batch = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
            for k, member in enumerate(self.members):
                logits = member(input_ids=batch, attention_mask=mask).logits[:, 0]
                out[k, start : start + len(chunk)] = logits.float()
        return out

    def normalised(self, conversations: list[list[dict]]) -> torch.Tensor:
        """(members, N), each member z-scored with its own training statistics."""
        raw = self.raw(conversations)
        for k, (mean, std) in enumerate(self.stats):
            raw[k] = (raw[k] - mean) / max(std, 1e-8)
        return raw

    def score(self, conversations: list[list[dict]]) -> tuple[list[float], list[float]]:
        """(ensemble mean, spread across members) of each conversation's last reply."""
        values = self.normalised(conversations)
        spread = values.std(0, unbiased=False) if len(self.members) > 1 else values[0] * 0
        return values.mean(0).tolist(), spread.tolist()


def learned_reward_signal(folder: Path) -> Callable[[list[Context]], list[float]]:
    """The signal of the reward model in ``folder``, loaded once: ``learned_reward``
    (trained on votes) or ``learned_engagement`` (on whether the user continued)."""
    if not (Path(folder) / INFO_FILE).exists():
        raise RapportError(f"{folder} is not a trained reward model (no {INFO_FILE})")
    ensemble = RewardEnsemble(folder)

    def learned_reward(contexts: list[Context]) -> list[float]:
        if not contexts:
            return []
        mean, _ = ensemble.score([reward_messages(c.prev_user, c.bot) for c in contexts])
        return mean

    learned_reward.__name__ = TARGETS[ensemble.info.get("target", "votes")]
    learned_reward.version = ensemble.version
    return learned_reward
