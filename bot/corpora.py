"""Corpora to import into the store: the chitchat dataset and a documented JSONL format.

Imported "bot" turns were written by people, not by the model, so they are stored with
``author = "person"``: the learner can tell human demonstrations from its own turns.

JSONL format (``rapport import jsonl FILE``), one conversation per line::

    {"id": "conv-1", "turns": [{"role": "user", "text": "hi"},
                               {"role": "bot", "text": "hello!", "author": "model"}]}

- ``turns`` (required): a non-empty list; ``role`` is ``user`` or ``bot``; ``text`` a
  non-blank string; ``author`` (optional) is ``person`` (default) or ``model``.
- ``id`` (optional): the corpus's conversation id; without it, a hash of the turns, so
  re-importing the same file adds nothing.
- ``speaker`` (optional): the corpus's id of the user-side person (stored hashed).

A bad line is reported with its line number and skipped; the good lines are imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bot.errors import RapportError
from bot.store import AUTHORS, ROLES, clean_text
from bot.store_data import Imported

CHITCHAT_PLATFORM = "chitchat"


def chitchat_path() -> Path:
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise RapportError("the chitchat corpus is not installed: run `make test` or `make chat`")
    return Path(next(iter(spec.submodule_search_locations))) / "dataset.json"


def chitchat_conversations(path: Path | None = None) -> Iterator[Imported]:
    """The chitchat-dataset corpus: the first speaker is the user, the other the bot.

    A corpus "message" is one speaker's run of utterances; it becomes one turn, its
    utterances joined by newlines.
    """
    with open(path or chitchat_path(), encoding="utf-8") as f:
        data = json.load(f)
    for conversation_id, conversation in data.items():
        messages = [m for m in conversation["messages"] if m]
        if not messages:
            continue
        first = messages[0][0]["sender"]
        turns = tuple(
            (
                "user" if message[0]["sender"] == first else "bot",
                "person",
                "\n".join(u["text"] for u in message),
            )
            for message in messages
        )
        turns = tuple(t for t in turns if t[2].strip())
        if turns:
            yield Imported(conversation_id, first, turns, messages[0][0].get("timestamp"))


@dataclass
class BadLine:
    number: int
    reason: str


def parse_jsonl_line(line: str) -> Imported:
    """One JSONL line as a conversation; ValueError says what is wrong with it."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError("expected an object with a 'turns' list")
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'turns' must be a non-empty list")
    parsed = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i} is not an object")
        role, author = turn.get("role"), turn.get("author", "person")
        if role not in ROLES:
            raise ValueError(f"turn {i}: role must be user or bot, got {role!r}")
        if author not in AUTHORS:
            raise ValueError(f"turn {i}: author must be person or model, got {author!r}")
        try:
            text = clean_text(turn.get("text"), f"turn {i} text")
        except RapportError as e:
            raise ValueError(str(e)) from None
        parsed.append((role, author, text))
    external_id = record.get("id")
    if external_id is None:
        canonical = json.dumps(parsed, ensure_ascii=False)
        external_id = "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    return Imported(str(external_id), str(record.get("speaker", external_id)), tuple(parsed))


def jsonl_conversations(path: Path, bad: list[BadLine]) -> Iterator[Imported]:
    """Conversations of a JSONL file; bad lines are appended to ``bad`` and skipped."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise RapportError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(BadLine(number, "not UTF-8 text"))
                continue
            if not line.strip():
                continue
            try:
                yield parse_jsonl_line(line)
            except ValueError as e:
                bad.append(BadLine(number, str(e)))
