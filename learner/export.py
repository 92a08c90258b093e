"""``rapport export``: the logs in the formats trl and other tools read.

- ``kto``, ``dpo``, ``sft``: the rows ``rapport train --algo kto|dpo|sft`` trains on
  (:mod:`learner.trl_data`: trl's conversational formats, each row with
  ``chat_template_kwargs = {"sanitize_control_tokens": true}`` so trl keeps typed control
  tokens plain text). JSON lines, or Parquet when the file name ends in ``.parquet``;
  both load with ``datasets.load_dataset("json" | "parquet", data_files=...)`` straight
  into trl's trainers.
- ``jsonl``: one conversation a line in ``rapport import jsonl``'s format (so it
  re-imports), each turn also with its ``votes`` and bot turns with their ``rewards``.
  The turns are the conversation as it went on; a reply kept after a retry lists the
  replies it replaced under ``replaced`` (text, votes, rewards), which the importer
  ignores.
- ``parquet``: the same log as one flat table, a row a message (retried replies too,
  ``replaced`` true), one nullable column a reward signal (``reward_<name>``), for
  pandas or polars.

Texts are exported as logged: the chat template is never rendered into the files.
"""

from __future__ import annotations

import json
from pathlib import Path

from bot.errors import RapportError
from bot.files import fault_point
from bot.store import Store
from learner.config import PAIRS_FROM
from learner.trl_data import dpo_rows, kept_replies, kto_rows, sft_rows
from rewards.suite import COMBINED, SIGNAL_NAMES

FORMATS = ("kto", "dpo", "sft", "jsonl", "parquet")
WHAT = {"kto": "voted bot turns", "dpo": "pairs of replies to the same context", "sft": "bot turns"}
RETRIED = "retried replies (/retry, 🔁)"
REWARD_NAMES = (COMBINED, *SIGNAL_NAMES)


def trl_rows(
    conversations: list[dict],
    fmt: str,
    system_prompt: str,
    *,
    context_turns: int,
    pairs_from: str,
) -> list[dict]:
    if fmt == "kto":
        return kto_rows(conversations, system_prompt, context_turns, pairs_from)
    if fmt == "dpo":
        return dpo_rows(conversations, system_prompt, context_turns, pairs_from)
    return sft_rows(conversations, system_prompt, context_turns)


def log_rows(store: Store, conversations: list[dict], fmt: str) -> list[dict]:
    """The whole log: a conversation a row (jsonl) or a message a row (parquet)."""
    rewards = store.reward_table(REWARD_NAMES)

    def turn_row(t: dict) -> dict:
        return {
            "role": t["role"],
            "author": t["author"],
            "text": t["text"],
            "votes": list(t["votes"]),
            **({"rewards": rewards.get(t["id"], {})} if t["role"] == "bot" else {}),
        }

    if fmt == "jsonl":
        kept = kept_replies(conversations)
        return [
            {
                "id": c["external_id"] or f"rapport:{c['id']}",
                "platform": c["platform"],
                "turns": [
                    {
                        **turn_row(t),
                        **(
                            {
                                "replaced": [
                                    turn_row(r) for r in c["turns"] if kept.get(r["id"]) == t["id"]
                                ]
                            }
                            if t["id"] in kept.values()
                            else {}
                        ),
                    }
                    for t in c["turns"]
                    if not t["replaced_by"]
                ],
            }
            for c in conversations
        ]
    return [
        {
            "conversation_id": c["id"],
            "platform": c["platform"],
            "turn_index": i,
            "role": t["role"],
            "author": t["author"],
            "text": t["text"],
            "votes": list(t["votes"]),
            "replaced": bool(t["replaced_by"]),
            **{f"reward_{n}": rewards.get(t["id"], {}).get(n) for n in REWARD_NAMES},
        }
        for c in conversations
        for i, t in enumerate(c["turns"])
    ]


def write_rows(rows: list[dict], path: Path, parquet: bool) -> None:
    """JSON lines (UTF-8, one object a line) or Parquet, written whole then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    if parquet:
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(tmp))
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    fault_point("export-written")
    tmp.replace(path)


def export(
    store: Store,
    fmt: str,
    path: Path,
    system_prompt: str,
    *,
    context_turns: int = 6,
    pairs_from: str = "votes",
    platform: str = "",
) -> int:
    """Write the export; return how many rows it has (an empty one is refused)."""
    if fmt not in FORMATS:
        raise RapportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if pairs_from not in PAIRS_FROM:
        raise RapportError(f"--pairs-from must be one of {', '.join(PAIRS_FROM)}")
    conversations = store.feedback_conversations(COMBINED, platform)
    if fmt in ("jsonl", "parquet"):
        rows = log_rows(store, conversations, fmt)
    else:
        rows = trl_rows(
            conversations,
            fmt,
            system_prompt,
            context_turns=context_turns,
            pairs_from=pairs_from,
        )
    if not rows:
        where = f" of platform {platform!r}" if platform else ""
        what = (
            RETRIED
            if pairs_from == "retries" and fmt in ("kto", "dpo")
            else WHAT.get(fmt, "conversations")
        )
        raise RapportError(f"nothing to export: no {what}{where} in the logs")
    write_rows(rows, path, parquet=fmt == "parquet" or path.suffix == ".parquet")
    return len(rows)
