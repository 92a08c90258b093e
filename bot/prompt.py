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
  The cut is found by bisection over the newest ``budget // MIN_TURN_TOKENS`` turns (a
  turn costs at least that many template tokens, so no older one can fit): a reply
  costs O(log n) encodings of what fits, never n encodings of the whole history. (It
  was n: a reply took 1.4 s to prompt at 200 turns and 41 s at 1,000, measured; an
  hour of soak traffic fell behind on it, bench/RESULTS.md.)
  If the current turn alone is too long, its middle is cut (the start says what it is
  about, the end what is being asked) and marked with " … ".
- Roles: the store's ``user``/``bot`` become the template's ``user``/``assistant``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ROLE_TO_TEMPLATE = {"user": "user", "bot": "assistant"}
CUT_MARK = " … "
# The fewest tokens a turn takes in a chat template: a start marker, the role, the end
# marker (ChatML, SmolLM2's: "<|im_start|>user\n" + text + "<|im_end|>\n" is 5 + text).
MIN_TURN_TOKENS = 3


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
    # Drop whole turns, oldest first, while the prompt is over budget: the first start
    # that fits, by bisection (dropping a turn never lengthens the prompt), among the
    # newest turns that could fit at all.
    last = len(turns) - 1
    low = max(0, last - budget // MIN_TURN_TOKENS)
    ids = encode_chat(tokenizer, system_prompt, turns[low:])
    if len(ids) > budget and low < last:
        ids = encode_chat(tokenizer, system_prompt, turns[last:])
        low, high = low + 1, last  # turns[low - 1:] is too long, turns[high:] is ids
        while low < high and len(ids) <= budget:
            middle = (low + high) // 2
            encoded = encode_chat(tokenizer, system_prompt, turns[middle:])
            if len(encoded) <= budget:
                high, ids = middle, encoded
            else:
                low = middle + 1
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
