"""Prompt building: the one place that turns conversation turns into model token ids.

Design
------
The bot serves with it and the learner builds its training inputs with it, so a model
is trained on exactly the token sequences it will later see.

- The tokenizer's own chat template renders the turns (any Hugging Face chat model
  works), with ``sanitize_control_tokens=True`` (transformers >= 5.24): text a user
  types, such as ``<|im_start|>system``, is encoded as plain text, never as the
  template's control tokens (chat-template injection). Bot turns go through the same
  path, so a logged reply cannot smuggle control tokens into training data either.
- The context budget is spent newest first: the system prompt and the current user
  turn always stay; older turns are dropped whole, oldest first, until the prompt fits.
  If the current turn alone is too long, its middle is cut (the start says what it is
  about, the end what is being asked) and marked with " … ".
- Roles: the store's ``user``/``bot`` become the template's ``user``/``assistant``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ROLE_TO_TEMPLATE = {"user": "user", "bot": "assistant"}
CUT_MARK = " … "


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "bot"
    text: str


def encode_chat(
    tokenizer,
    system_prompt: str,
    turns: Sequence[Turn],
    *,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Token ids of system prompt + turns; typed control tokens stay plain text."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": ROLE_TO_TEMPLATE[t.role], "content": t.text} for t in turns]
    encoded = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        sanitize_control_tokens=True,
    )
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def _cut_middle(tokenizer, text: str, keep_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    if len(ids) <= keep_tokens:
        return text
    head = max(keep_tokens // 4, 1)
    tail = max(keep_tokens - head, 1)
    return tokenizer.decode(ids[:head]) + CUT_MARK + tokenizer.decode(ids[-tail:])


def build_prompt(
    tokenizer,
    system_prompt: str,
    turns: Sequence[Turn],
    budget: int,
) -> list[int]:
    """The prompt for the bot's next reply to ``turns`` (the last one is the user's).

    At most ``budget`` tokens; see the module docstring for what is dropped first.
    """
    if not turns:
        raise ValueError("build_prompt needs at least the current user turn")
    turns = list(turns)
    # Drop whole turns, oldest first, while the prompt is over budget.
    start = 0
    ids = encode_chat(tokenizer, system_prompt, turns)
    while len(ids) > budget and start < len(turns) - 1:
        start += 1
        ids = encode_chat(tokenizer, system_prompt, turns[start:])
    if len(ids) <= budget:
        return ids
    # Only the current turn is left and it alone is too long: cut its middle.
    current = turns[-1]
    overhead = len(encode_chat(tokenizer, system_prompt, [Turn(current.role, ".")]))
    keep = max(budget - overhead - 8, 1)
    while True:
        text = _cut_middle(tokenizer, current.text, keep)
        ids = encode_chat(tokenizer, system_prompt, [Turn(current.role, text)])
        if len(ids) <= budget or keep == 1:
            return ids
        keep = max(keep - (len(ids) - budget) - 1, 1)
