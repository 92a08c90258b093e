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
- Retries: a reply the user retried (``replaced_by`` set) is off the conversation's
  path. Its prompt is the path before it, the same as the reply that replaced it, and
  no later prompt contains it. ``retries`` is a preference source of its own: DPO pairs
  (the kept reply, each reply it replaced, directly or through a chain of retries),
  KTO labels (replaced: not liked; kept after a retry: liked). It is kept apart from
  ``votes`` rather than mixed in: a retry says "another one", not "this one is good",
  so the two sources disagree at times (a 👍 on a reply, then a retry of it), and a run's
  config then says which kind of preference it learned from.
- The safety filter's fallback line (``fallback``) is not the model's reply: it is
  context for later prompts, never a completion (no SFT row, no KTO label, never DPO's
  chosen reply over the replies it stands in for).
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
    """(turn, prompt messages, completion messages) for every bot turn the model wrote,
    retried ones too (not the safety filter's fallback line); a prompt is made of the
    conversation's path (turns no retry replaced, the fallback line included)."""
    for conversation in conversations:
        path: list[dict] = []
        for turn in conversation["turns"]:
            if turn["role"] == "bot" and not turn.get("fallback"):
                context = path[max(0, len(path) - context_turns) :]
                yield turn, chat_messages(system_prompt, context), chat_messages("", [turn])
            if not turn.get("replaced_by"):
                path.append(turn)


def kept_replies(conversations: list[dict]) -> dict[int, int]:
    """{id of a retried reply: id of the reply the conversation kept instead}, following
    chains of retries to their end."""
    replaced_by = {
        t["id"]: t["replaced_by"] for c in conversations for t in c["turns"] if t.get("replaced_by")
    }
    kept = {}
    for replaced, by in replaced_by.items():
        while by in replaced_by:
            by = replaced_by[by]
        kept[replaced] = by
    return kept


def retry_score(turn: dict, kept: dict[int, int]) -> float | None:
    """-1 for a retried reply, +1 for a reply kept after a retry, None otherwise."""
    if turn["id"] in kept:
        return -1.0
    return 1.0 if turn["id"] in kept.values() else None


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
    turns (a turn exactly at the mean says nothing and is left out); ``retries``: a
    retried reply is not liked, the reply kept after a retry is."""
    turns = list(bot_turns(conversations, system_prompt, context_turns))
    scored = [t["reward"] for t, _, _ in turns if t.get("reward") is not None]
    mean = sum(scored) / len(scored) if scored else 0.0
    kept = kept_replies(conversations)
    rows = []
    for turn, prompt, completion in turns:
        if labels_from == "votes":
            score = sum(turn.get("votes") or ())
        elif labels_from == "retries":
            score = retry_score(turn, kept)
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
    """SFT's prompt-completion format: every bot turn on the conversation's path (a
    reply a retry or the safety filter replaced is never imitated) whose reward reaches
    ``min_reward`` when it is finite (unscored turns count as below it)."""
    rows = []
    for turn, prompt, completion in bot_turns(conversations, system_prompt, context_turns):
        if turn.get("replaced_by"):
            continue
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
    (``votes``: their mean vote; ``combined``: the combined implicit reward;
    ``retries``: the reply the conversation kept over each reply a retry replaced)."""
    if pairs_from == "retries":
        return retry_pairs(conversations, system_prompt, context_turns)
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
                rows.append(dpo_row(prompt, chosen, rejected))
    return rows


def retry_pairs(conversations: list[dict], system_prompt: str, context_turns: int) -> list[dict]:
    """(kept, replaced) pairs: the reply a conversation kept, over each one it replaced
    (the same prompt: the path up to the user turn both answer)."""
    kept = kept_replies(conversations)
    turns = {
        turn["id"]: (prompt, completion)
        for turn, prompt, completion in bot_turns(conversations, system_prompt, context_turns)
    }
    return [
        dpo_row(turns[replaced][0], turns[keeper][1], turns[replaced][1])
        for replaced, keeper in kept.items()
        # a fallback line is no chosen reply; the same text twice prefers nothing
        if keeper in turns and turns[replaced][1] != turns[keeper][1]
    ]


def dpo_row(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> dict:
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "chat_template_kwargs": SAFE_TEMPLATE,
    }
