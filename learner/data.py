"""Training data from the logs: token-level transitions over the bot's tokens.

Design
------
- A snapshot of the store (``VACUUM INTO`` a file) is read, never the live database in
  a long transaction. Every conversation with scored bot turns is tokenised with the
  bot's own prompt builder (:func:`bot.prompt.encode_chat`, so typed control tokens stay
  text here too).
- A conversation becomes one or more *windows* of at most ``max_tokens``: the system
  prompt, some earlier turns as context, one or more trained bot turns with the user
  turns between them, and — when the conversation goes on — the user's reply and the
  header of the bot's next turn, so that value bootstraps across the user's reply.
  Single turns longer than a quarter of the window are cut in the middle first.
- Position ``t`` of a window is the state (tokens ``0..t``); its action is token
  ``t+1``. For every action that is a bot token (the reply's tokens and its end-of-turn
  token) the window records: ``mask`` (train on it), ``reward`` (the bot turn's
  combined reward on its last token only, once per turn: a per-token reward would favour
  long replies), ``next_pos`` (the position whose value the target bootstraps from:
  ``t+1`` inside a reply, the next bot turn's header after the end-of-turn token) and
  ``-1`` when the conversation ends there (terminal).
- A reply cut at the length limit (or interrupted) never ended by the model's choice:
  its end-of-turn token is not trained, and its reward sits on its last real token,
  which bootstraps across the user's reply as a chosen end would. Training that forced
  end as an action taught the bot to stop mid-sentence (after "the", "to").
- Rewards reach the learner in z-units: :func:`normalise_rewards` z-scores the chosen
  reward over the trained turns and clips it (``reward_clip``), whatever the signal: a
  raw single signal (reply length in words) and a rare event (one vote among thousands
  of turns, which a z-score alone puts at +100) both become a reward of a few units.
- The prior's ``log p(a|s)`` of every logged action never changes; it is computed once
  (:func:`add_prior_logprobs`) and saved with the dataset, with the prior's log-partition
  ``b(s) = log Σ_a exp logit(s, a)`` of every state (see :mod:`learner.kl_control`).
- Imported corpora have human-written "bot" turns (``author = person``), chat logs the
  model's own; both are usable and the dataset's metadata counts which were used.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bot.prompt import Turn, _cut_middle, encode_chat

TERMINAL = -1
# Part of every dataset id: a change to how windows are built or what is cached with
# them makes new ids, so an old cached dataset is never read as a new one.
DATA_VERSION = "2"


@dataclass
class Window:
    input_ids: list[int]
    mask: list[bool]  # position t trains on action input_ids[t+1]
    reward: list[float]  # combined reward on the last action of each bot turn
    next_pos: list[int]  # bootstrap position, TERMINAL at the end of a conversation
    turn_reward: list[float]  # the reward of the bot turn each action belongs to
    conversation_id: int = 0
    logp: list[float] = field(default_factory=list)  # prior log p(a_t|s_t), 0 off-mask
    prior_lse: list[float] = field(default_factory=list)  # prior log Σ_a exp logit(s_t, a)
    prior_max: list[float] = field(default_factory=list)  # prior max_a log p(a|s_t)


@dataclass
class Dataset:
    train: list[Window]
    val: list[Window]
    meta: dict

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "windows.pt.tmp"
        torch.save(
            {"train": [asdict(w) for w in self.train], "val": [asdict(w) for w in self.val]}, tmp
        )
        tmp.replace(folder / "windows.pt")
        (folder / "meta.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: Path) -> Dataset:
        data = torch.load(folder / "windows.pt", weights_only=True)
        meta = json.loads((folder / "meta.json").read_text())
        return cls([Window(**w) for w in data["train"]], [Window(**w) for w in data["val"]], meta)


def turn_spans(tokenizer, system_prompt: str, turns: list[Turn], next_bot: bool):
    """Token ids of ``turns`` (+ the next bot header if ``next_bot``), and for each bot
    turn the [start, end) span of its action tokens (its text and end-of-turn token)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if eos is None or eos == tokenizer.unk_token_id:
        eos = tokenizer.eos_token_id
    spans = {}
    for k, turn in enumerate(turns):
        if turn.role != "bot":
            continue
        before = encode_chat(tokenizer, system_prompt, turns[:k], add_generation_prompt=True)
        upto = encode_chat(tokenizer, system_prompt, turns[: k + 1], add_generation_prompt=False)
        if upto[: len(before)] != before:
            raise ValueError("the chat template is not prefix-consistent; cannot find turns")
        end = max(i for i, tok in enumerate(upto) if tok == eos) + 1
        spans[k] = (len(before), end)
    ids = encode_chat(tokenizer, system_prompt, turns, add_generation_prompt=next_bot)
    return ids, spans


def _window(tokenizer, system_prompt, turns, rewards, start, end, next_bot, cuts=None):
    """One window over turns[start:end] (trained: scored bot turns from the first bot
    turn not used as context), bootstrapping into the next bot turn if ``next_bot``.
    ``cuts[k]``: turn k was cut at the length limit (its end-of-turn is not trained)."""
    local = turns[start:end]
    ids, spans = turn_spans(tokenizer, system_prompt, local, next_bot)
    n = len(ids)
    window = Window(ids, [False] * n, [0.0] * n, [TERMINAL] * n, [0.0] * n)
    bot_ks = sorted(spans)
    for j, k in enumerate(bot_ks):
        reward = rewards[start + k]
        if reward is None:
            continue
        s, e = spans[k]
        if cuts and cuts[start + k]:
            e -= 1  # the forced end-of-turn is not an action the model chose
        if e - 1 <= s - 1:
            continue
        for pos in range(s - 1, e - 1):  # position pos predicts token pos+1
            window.mask[pos] = True
            window.turn_reward[pos] = reward
            window.next_pos[pos] = pos + 1
        last = e - 2
        window.reward[last] = reward
        if j + 1 < len(bot_ks):
            window.next_pos[last] = spans[bot_ks[j + 1]][0] - 1
        elif next_bot:
            window.next_pos[last] = n - 1  # the generation prompt of the next bot turn
        else:
            window.next_pos[last] = TERMINAL
    return window


def conversation_windows(
    tokenizer, system_prompt: str, conversation: dict, max_tokens: int
) -> list[Window]:
    """Cut one conversation into windows of at most ``max_tokens`` (see module doc)."""
    turn_budget = max(max_tokens // 4, 8)
    turns = [
        Turn(t["role"], _cut_middle(tokenizer, t["text"], turn_budget))
        for t in conversation["turns"]
    ]
    rewards = [t["reward"] if t["role"] == "bot" else None for t in conversation["turns"]]
    cuts = [bool(t.get("cut")) for t in conversation["turns"]]
    bots = [k for k, t in enumerate(turns) if t.role == "bot"]
    trained = [k for k in bots if rewards[k] is not None]
    # A live conversation whose user has answered the last bot turn goes on: its next
    # state is the bot about to reply (a bootstrap), not the end.
    live = not conversation.get("ended", True) and turns and turns[-1].role == "user"

    def following(end: int) -> tuple[int, bool]:
        """(stop, bootstrap into a next bot turn?) of a window whose turns end at end."""
        later = [k for k in bots if k >= end]
        if later:
            return later[0], True
        return (len(turns), True) if live else (end, False)

    def length(start: int, end: int) -> int:
        stop, next_bot = following(end)
        ids = encode_chat(
            tokenizer, system_prompt, turns[start:stop], add_generation_prompt=next_bot
        )
        return len(ids)

    windows = []
    i = 0
    while i < len(trained):
        first = trained[i]
        start = first
        # context: earlier turns while the window's head stays within half the budget
        while start > 0 and length(start - 1, first + 1) <= max_tokens // 2:
            start -= 1
        end = first + 1
        j = i + 1
        while j < len(trained) and length(start, trained[j] + 1) <= max_tokens:
            end = trained[j] + 1
            j += 1
        if length(start, end) > max_tokens:  # even one turn does not fit: skip it
            i += 1
            continue
        stop, next_bot = following(end)
        trained_here = [r if first <= k < end else None for k, r in enumerate(rewards)]
        window = _window(tokenizer, system_prompt, turns, trained_here, start, stop, next_bot, cuts)
        window.conversation_id = conversation["id"]
        windows.append(window)
        i = j
    return windows


def normalise_rewards(conversations: list[dict], clip: float) -> dict:
    """Z-score every bot turn's reward over all scored bot turns, clip to ±``clip``, in
    place; return the statistics (for the dataset's metadata). A constant reward becomes
    0 everywhere (nothing to learn), never a division by zero."""
    values = [
        t["reward"]
        for c in conversations
        for t in c["turns"]
        if t["role"] == "bot" and t["reward"] is not None and math.isfinite(t["reward"])
    ]
    n = len(values)
    mean = math.fsum(values) / n if n else 0.0
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / n) if n else 0.0
    clipped = 0
    for c in conversations:
        for t in c["turns"]:
            if t["role"] != "bot" or t["reward"] is None:
                continue
            raw = t["reward"] if math.isfinite(t["reward"]) else mean
            z = (raw - mean) / std if std > 1e-8 else 0.0
            clipped += abs(z) > clip
            t["reward"] = max(-clip, min(clip, z))
    return {"mean": mean, "std": std, "turns": n, "clipped": clipped, "clip": clip}


def is_validation(conversation_id: int, fraction: float) -> bool:
    """A stable split by conversation: the same conversations are held out every time."""
    digest = hashlib.sha256(str(conversation_id).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def build_dataset(
    conversations: list[dict],
    tokenizer,
    system_prompt: str,
    max_tokens: int,
    val_fraction: float,
    source: str,
) -> Dataset:
    train, val = [], []
    authors = {"person": 0, "model": 0}
    for conversation in conversations:
        for turn in conversation["turns"]:
            if turn["role"] == "bot" and turn["reward"] is not None:
                authors[turn["author"]] = authors.get(turn["author"], 0) + 1
        windows = conversation_windows(tokenizer, system_prompt, conversation, max_tokens)
        (val if is_validation(conversation["id"], val_fraction) else train).extend(windows)
    digest = hashlib.sha256(DATA_VERSION.encode())
    for w in train + val:
        digest.update(json.dumps([w.input_ids, w.reward, w.next_pos]).encode())
    meta = {
        "id": digest.hexdigest()[:16],
        "source": source,
        "conversations": len(conversations),
        "train_windows": len(train),
        "val_windows": len(val),
        "bot_turns_by_author": authors,
        "max_tokens": max_tokens,
        "system_prompt": system_prompt,
    }
    return Dataset(train, val, meta)


@torch.no_grad()
def add_prior_logprobs(dataset: Dataset, prior, batch_size: int = 8, progress=None) -> None:
    """Cache the prior's log p(a_t|s_t) of every logged action and its log-partition
    b(s_t) and max log-probability of every state (none of them ever changes).
    ``progress(k)`` is called after every k windows."""
    device = next(prior.parameters()).device
    for windows in (dataset.train, dataset.val):
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            batch = collate(chunk, pad_id=0)
            logits = prior(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits.float()
            lse = torch.logsumexp(logits, dim=-1)  # (B, T): b(s), the log-partition
            top = logits.max(dim=-1).values - lse  # (B, T): max_a log p(a|s)
            actions = batch["actions"].to(device).unsqueeze(-1)
            logp = logits.gather(-1, actions).squeeze(-1) - lse  # (B, T)
            for i, w in enumerate(chunk):
                n = len(w.input_ids)
                values = logp[i, :n].cpu()
                w.logp = [float(v) if m else 0.0 for v, m in zip(values, w.mask, strict=True)]
                w.prior_lse = [float(v) for v in lse[i, :n].cpu()]
                w.prior_max = [float(v) for v in top[i, :n].cpu()]
            if progress:
                progress(len(chunk))
    dataset.meta["prior_logprobs"] = True


def collate(windows: list[Window], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad windows to one (B, T) batch; padded positions are masked out."""
    length = max(len(w.input_ids) for w in windows)
    out = {
        "input_ids": torch.full((len(windows), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(windows), length, dtype=torch.long),
        "actions": torch.zeros(len(windows), length, dtype=torch.long),
        "mask": torch.zeros(len(windows), length, dtype=torch.bool),
        "reward": torch.zeros(len(windows), length),
        "next_pos": torch.full((len(windows), length), TERMINAL, dtype=torch.long),
        "turn_reward": torch.zeros(len(windows), length),
        "logp": torch.zeros(len(windows), length),
        "prior_lse": torch.zeros(len(windows), length),
        "prior_max": torch.zeros(len(windows), length),
    }
    for i, w in enumerate(windows):
        n = len(w.input_ids)
        out["input_ids"][i, :n] = torch.tensor(w.input_ids)
        out["attention_mask"][i, :n] = 1
        out["actions"][i, : n - 1] = torch.tensor(w.input_ids[1:])
        out["mask"][i, :n] = torch.tensor(w.mask)
        out["reward"][i, :n] = torch.tensor(w.reward)
        out["next_pos"][i, :n] = torch.tensor(w.next_pos)
        out["turn_reward"][i, :n] = torch.tensor(
            [r if math.isfinite(r) else 0.0 for r in w.turn_reward]
        )
        if w.logp:
            out["logp"][i, :n] = torch.tensor(w.logp)
            out["prior_lse"][i, :n] = torch.tensor(w.prior_lse)
        if w.prior_max:  # datasets prepared before DATA_VERSION 2 lack it
            out["prior_max"][i, :n] = torch.tensor(w.prior_max)
    return out
