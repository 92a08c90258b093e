"""The logs as trl datasets: KTO rows, DPO and reward-model pairs, SFT rows.

Design
------
- One row a bot turn, in trl's *conversational* formats: ``prompt`` is the system
  prompt and the last ``context_turns`` turns before the bot turn as chat messages
  (``user``/``assistant``, as :mod:`bot.prompt` maps the store's roles), ``completion``
  the bot turn as one assistant message. KTO adds ``label`` (the votes' sum > 0), DPO and
  the reward model use ``chosen``/``rejected``.
- Safe encoding: every row carries ``chat_template_kwargs = {"sanitize_control_tokens":
  True}``. trl's KTO, DPO, SFT and reward trainers pass a row's ``chat_template_kwargs``
  to ``apply_chat_template``, so a user's typed ``<|im_start|>system`` is tokenised as
  plain text exactly as :func:`bot.prompt.encode_chat` does when the bot serves (tested
  token for token in tests/test_trl_learners.py). Rows never hold pre-rendered template
  text, which another tool could not tell apart from real control tokens.
- KTO: a bot turn with votes whose sum is 0 (one up, one down) says nothing and is left
  out. DPO: pairs need the *same* prompt (DPO compares two replies to one context); the
  replies to one prompt are ranked by their votes or by the combined implicit reward,
  and every two with different scores form a pair (chosen = the higher).
- The reward model's pairs are built in :mod:`learner.reward_model` (its own view of a
  turn, the same at training and scoring time).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

from bot.prompt import ROLE_TO_TEMPLATE

SAFE_TEMPLATE = {"sanitize_control_tokens": True}


def chat_messages(system_prompt: str, turns: list[dict]) -> list[dict]:
    """The store's turns as chat messages, the system prompt first (if any)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": ROLE_TO_TEMPLATE[t["role"]], "content": t["text"]} for t in turns]


def bot_turns(
    conversations: list[dict], system_prompt: str, context_turns: int
) -> Iterator[tuple[dict, list[dict], list[dict]]]:
    """(turn, prompt messages, completion messages) for every bot turn."""
    for conversation in conversations:
        turns = conversation["turns"]
        for k, turn in enumerate(turns):
            if turn["role"] != "bot":
                continue
            context = turns[max(0, k - context_turns) : k]
            yield turn, chat_messages(system_prompt, context), chat_messages("", [turn])


def vote_score(turn: dict) -> float | None:
    """The mean of a turn's votes (manual_vote), None without votes."""
    votes = turn.get("votes") or ()
    return sum(votes) / len(votes) if votes else None


def kto_rows(
    conversations: list[dict], system_prompt: str, context_turns: int, labels_from: str = "votes"
) -> list[dict]:
    """KTO's unpaired preference format: one row a bot turn, label = liked. ``votes``:
    the voted turns, liked when the votes' sum is positive; ``combined``: every scored
    turn, liked when its stored reward (``--reward``) is above the mean of all scored
    turns (a turn exactly at the mean says nothing and is left out)."""
    turns = list(bot_turns(conversations, system_prompt, context_turns))
    scored = [t["reward"] for t, _, _ in turns if t.get("reward") is not None]
    mean = sum(scored) / len(scored) if scored else 0.0
    rows = []
    for turn, prompt, completion in turns:
        if labels_from == "votes":
            score = sum(turn.get("votes") or ())
        else:
            score = None if turn.get("reward") is None else turn["reward"] - mean
        if not score:
            continue
        rows.append(
            {
                "prompt": prompt,
                "completion": completion,
                "label": score > 0,
                "chat_template_kwargs": SAFE_TEMPLATE,
            }
        )
    return rows


def sft_rows(
    conversations: list[dict],
    system_prompt: str,
    context_turns: int,
    min_reward: float = float("-inf"),
) -> list[dict]:
    """SFT's prompt-completion format: every bot turn (whose reward reaches
    ``min_reward`` when it is finite; unscored turns count as below it)."""
    rows = []
    for turn, prompt, completion in bot_turns(conversations, system_prompt, context_turns):
        if math.isfinite(min_reward) and (turn["reward"] is None or turn["reward"] < min_reward):
            continue
        rows.append(
            {"prompt": prompt, "completion": completion, "chat_template_kwargs": SAFE_TEMPLATE}
        )
    return rows


def dpo_rows(
    conversations: list[dict], system_prompt: str, context_turns: int, pairs_from: str
) -> list[dict]:
    """DPO's preference format: two replies to the same prompt, ranked by ``pairs_from``
    (``votes``: their mean vote; ``combined``: the combined implicit reward)."""
    by_prompt: dict[str, list[tuple[float, list[dict], list[dict]]]] = {}
    for turn, prompt, completion in bot_turns(conversations, system_prompt, context_turns):
        score = vote_score(turn) if pairs_from == "votes" else turn["reward"]
        if score is None:
            continue
        key = json.dumps(prompt, sort_keys=True)
        by_prompt.setdefault(key, []).append((score, prompt, completion))
    rows = []
    for replies in by_prompt.values():
        for i, (score_a, prompt, a) in enumerate(replies):
            for score_b, _, b in replies[i + 1 :]:
                if score_a == score_b or a == b:
                    continue
                chosen, rejected = (a, b) if score_a > score_b else (b, a)
                rows.append(
                    {
                        "prompt": prompt,
                        "chosen": chosen,
                        "rejected": rejected,
                        "chat_template_kwargs": SAFE_TEMPLATE,
                    }
                )
    return rows
