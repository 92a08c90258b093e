"""The store's tables for learning: rewards, scoring progress, imports, snapshots.

A mixin of :class:`bot.store.Store` (split off to keep each file readable): it uses the
store's ``_write()`` transaction and ``_read()`` query helpers, and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

# One reward value per (message, name); a rescore replaces it.
UPSERT_REWARD = (
    "INSERT INTO rewards (message_id, name, value, scorer_version, created) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (message_id, name) DO UPDATE SET "
    "value = excluded.value, scorer_version = excluded.scorer_version, "
    "created = excluded.created"
)


def storable(text: str) -> str:
    """``text`` as SQLite can hold it: the one normalisation of logged text. A lone
    surrogate (a byte that was not UTF-8, as a terminal's ``surrogateescape`` hands it
    over, or a ``\\udxxx`` escape in JSON) becomes U+FFFD; everything else is kept."""
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
        text = "".join("\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch for ch in text)
    return text


def now() -> str:
    """UTC timestamp with microseconds, sortable as text (every table's clock)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class LearningData:
    # -- rewards --------------------------------------------------------------------

    def set_rewards(self, rows: Iterable[tuple[int, str, float, str]]) -> int:
        """Upsert (message_id, reward name, value, scorer version) rows in one transaction."""
        created = now()
        values = [(int(m), str(n), float(v), str(s), created) for m, n, v, s in rows]
        with self._write() as db:
            present = _present(db, {v[0] for v in values})  # once: it was once per row
            values = [v for v in values if v[0] in present]
            db.conn.executemany(UPSERT_REWARD, values)
        return len(values)

    def rewards(self, message_id: int) -> dict[str, float]:
        rows = self._read("SELECT name, value FROM rewards WHERE message_id = ?", [message_id])
        return {r["name"]: r["value"] for r in rows}

    # -- imported corpora -----------------------------------------------------------

    def has_imported(self, platform: str, external_id: str) -> bool:
        """Whether the conversation (platform, external id) is already stored."""
        return bool(
            self._read(
                "SELECT 1 FROM conversations WHERE platform = ? AND external_id = ?",
                [platform, external_id],
            )
        )

    def import_conversations(self, platform: str, conversations: Iterable[Imported]) -> int:
        """Add whole conversations in one transaction; skip those already imported.

        Returns how many were added. Conversations are keyed by (platform, external id).
        """
        added = 0
        platform = storable(platform)
        with self._write() as db:
            for conv in conversations:
                conv = replace(conv, external_id=storable(conv.external_id))
                if db.execute(
                    "SELECT 1 FROM conversations WHERE platform = ? AND external_id = ?",
                    [platform, conv.external_id],
                ).fetchone():
                    continue
                user_id = self.pseudonym("user", platform, conv.speaker)
                db.execute(
                    "INSERT OR IGNORE INTO users (id, platform, created, opted_out) "
                    "VALUES (?, ?, ?, 0)",
                    [user_id, platform, now()],
                )
                started = conv.started or now()
                cursor = db.execute(  # a corpus or self-play conversation is finished
                    "INSERT INTO conversations (user_id, platform, started, external_id, "
                    "model_version, ended, end_reason) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        user_id,
                        platform,
                        started,
                        conv.external_id,
                        conv.model_version,
                        started,
                        "simulated" if platform == "simulated" else "imported",
                    ],
                )
                created = now()
                generations = conv.generations or (None,) * len(conv.turns)
                db.conn.executemany(
                    "INSERT INTO messages (conversation_id, turn_index, role, author, user_id,"
                    " text, created, model_version, generation)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            cursor.lastrowid,
                            i,
                            role,
                            author,
                            user_id,
                            text,
                            created,
                            conv.model_version if role == "bot" else None,
                            json.dumps(generation, sort_keys=True) if generation else None,
                        )
                        for i, ((role, author, text), generation) in enumerate(
                            zip(conv.turns, generations, strict=True)
                        )
                    ],
                )
                db.conn.executemany(  # a withdrawn reply is replaced by the turn after it
                    "UPDATE messages SET replaced_by = (SELECT n.id FROM messages n WHERE "
                    "n.conversation_id = messages.conversation_id AND n.turn_index = ?) "
                    "WHERE conversation_id = ? AND turn_index = ?",
                    [(i + 1, cursor.lastrowid, i) for i, r in enumerate(conv.replaced) if r],
                )
                added += 1
        return added

    # -- scoring --------------------------------------------------------------------

    def conversations_to_score(self, scorer_version: str) -> list[int]:
        """Conversations with a bot turn never scored, scored by another scorer version,
        or whose surroundings changed since (a new turn after it, a vote on it)."""
        rows = self._read(
            f"""
            SELECT DISTINCT m.conversation_id AS id FROM messages m
            LEFT JOIN scoring s ON s.message_id = m.id
            WHERE m.role = 'bot' AND {NEEDS_SCORING}
            ORDER BY m.conversation_id
            """,
            [scorer_version],
        )
        return [r["id"] for r in rows]

    def turns_to_score(self, scorer_version: str) -> int:
        """How many bot turns ``rapport score`` will score now: those that need it, less
        the last turn of a live conversation that the user has not answered yet."""
        rows = self._read(
            f"""SELECT COUNT(*) AS n FROM messages m LEFT JOIN scoring s ON s.message_id = m.id
            WHERE m.role = 'bot' AND {NEEDS_SCORING} AND NOT (
                m.replaced_by IS NULL AND {NEXT_ON_PATH} IS NULL AND NOT {ENDED})""",
            [scorer_version],
        )
        return rows[0]["n"]

    def conversation_ended(self, conversation_id: int) -> bool:
        rows = self._read("SELECT ended FROM conversations WHERE id = ?", [conversation_id])
        return bool(rows and rows[0]["ended"])

    def end_conversation(self, conversation_id: int, reason: str) -> None:
        """Mark a live conversation ended (a second end keeps the first)."""
        with self._write() as db:
            db.execute(
                "UPDATE conversations SET ended = ?, end_reason = ? WHERE id = ? AND ended IS NULL",
                [now(), reason, conversation_id],
            )

    def end_idle_conversations(self, idle_minutes: float) -> int:
        """End every live conversation whose last turn is older than ``idle_minutes``
        (ended at that last turn); return how many."""
        cutoff = (datetime.now(UTC) - timedelta(minutes=idle_minutes)).isoformat(
            timespec="microseconds"
        )
        with self._write() as db:
            cursor = db.execute(
                """
                UPDATE conversations SET end_reason = 'idle', ended = coalesce(
                    (SELECT MAX(m.created) FROM messages m
                     WHERE m.conversation_id = conversations.id), started)
                WHERE ended IS NULL AND coalesce(
                    (SELECT MAX(m.created) FROM messages m
                     WHERE m.conversation_id = conversations.id), started) < ?
                """,
                [cutoff],
            )
            return cursor.rowcount

    def conversation_turns(
        self, conversation_ids: list[int], scorer_version: str | None = None
    ) -> dict[int, list[dict]]:
        """The messages of several conversations, in order, replaced replies too (with
        ``replaced_by``), each with its votes, its conversation's ``rating`` (the
        answers, () if unrated), ``created``, ``live`` (a chat, not an imported or
        simulated log: its times are real), ``unsafe`` (the safety filter withdrew it)
        the fingerprint the scorer records, and ``needs_scoring`` by ``scorer_version``
        (bot turns; None: score every one): {conversation id: [message dicts]}."""
        if not conversation_ids:
            return {}
        marks = ",".join("?" * len(conversation_ids))
        rows = self._read(
            f"""
            SELECT m.id, m.conversation_id, m.turn_index, m.role, m.author, m.text,
                m.replaced_by, m.created, {RATING} AS rating,
                (SELECT c.external_id IS NULL FROM conversations c
                 WHERE c.id = m.conversation_id) AS live,
                (SELECT GROUP_CONCAT(value) FROM votes v WHERE v.message_id = m.id) AS votes,
                {FINGERPRINT} AS fingerprint, {ENDED} AS ended,
                json_extract(m.generation, '$.unsafe') IS NOT NULL AS unsafe,
                s.scorer_version AS scored_version, s.fingerprint AS scored_fingerprint
            FROM messages m LEFT JOIN scoring s ON s.message_id = m.id
            WHERE m.conversation_id IN ({marks})
            ORDER BY m.conversation_id, m.turn_index
            """,
            conversation_ids,
        )
        turns: dict[int, list[dict]] = {cid: [] for cid in conversation_ids}
        for row in rows:
            row["votes"] = tuple(int(v) for v in row["votes"].split(",")) if row["votes"] else ()
            row["rating"] = tuple(int(v) for v in row["rating"].split(",")) if row["rating"] else ()
            # as NEEDS_SCORING, from the fingerprint already read
            scored = (row.pop("scored_version"), row.pop("scored_fingerprint"))
            row["needs_scoring"] = scored != (scorer_version, row["fingerprint"])
            row["needs_scoring"] |= scorer_version is None
            turns[row["conversation_id"]].append(row)
        return turns

    def clear_scores(self, message_ids: list[int]) -> None:
        """Forget the rewards and scoring marks of these bot turns (not scorable now)."""
        if not message_ids:
            return
        with self._write() as db:
            for start in range(0, len(message_ids), 500):
                chunk = message_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                db.execute(f"DELETE FROM rewards WHERE message_id IN ({marks})", chunk)
                db.execute(f"DELETE FROM scoring WHERE message_id IN ({marks})", chunk)

    def save_scores(
        self,
        values: Iterable[tuple[int, str, float]],
        fingerprints: dict[int, str],
        scorer_version: str,
    ) -> None:
        """Raw signal values and the scoring marks of their turns, in one transaction:
        a kill between two batches leaves each batch wholly scored or not at all. Turns
        deleted since they were read (a user's /forget while ``rapport score`` runs) are
        skipped, not an error."""
        created = now()
        values = list(values)
        with self._write() as db:
            present = _present(db, {m for m, _, _ in values} | set(fingerprints))
            fingerprints = {m: f for m, f in fingerprints.items() if m in present}
            db.conn.executemany(
                UPSERT_REWARD,
                [(m, n, float(v), scorer_version, created) for m, n, v in values if m in present],
            )
            db.conn.executemany(
                "INSERT INTO scoring (message_id, scorer_version, fingerprint, scored) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (message_id) DO UPDATE SET "
                "scorer_version = excluded.scorer_version, "
                "fingerprint = excluded.fingerprint, scored = excluded.scored",
                [(m, scorer_version, f, created) for m, f in fingerprints.items()],
            )

    def reward_table(self, names: Iterable[str]) -> dict[int, dict[str, float]]:
        """{bot message id: {signal: value}} for the named signals."""
        names = list(names)
        marks = ",".join("?" * len(names))
        table: dict[int, dict[str, float]] = {}
        for row in self._read(
            f"SELECT message_id, name, value FROM rewards WHERE name IN ({marks})", names
        ):
            table.setdefault(row["message_id"], {})[row["name"]] = row["value"]
        return table

    def save_reward_stats(self, stats: dict[str, tuple[float, float, int]], version: str) -> None:
        updated = now()
        with self._write() as db:
            db.conn.executemany(
                "INSERT INTO reward_stats (name, mean, std, count, scorer_version, updated) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET mean = "
                "excluded.mean, std = excluded.std, count = excluded.count, "
                "scorer_version = excluded.scorer_version, updated = excluded.updated",
                [(n, m, s, c, version, updated) for n, (m, s, c) in stats.items()],
            )

    def reward_stats(self) -> dict[str, tuple[float, float, int]]:
        return {
            r["name"]: (r["mean"], r["std"], r["count"])
            for r in self._read("SELECT * FROM reward_stats")
        }

    def scored_examples(self, name: str, limit: int = 3) -> list[dict[str, Any]]:
        """The ``limit`` lowest then the ``limit`` highest bot turns by one signal, with
        the user turns around them (for reports)."""
        query = """
            SELECT r.message_id, r.value, m.text AS bot,
                (SELECT CASE p.role WHEN 'user' THEN p.text END FROM messages p
                 WHERE p.conversation_id = m.conversation_id AND p.turn_index < m.turn_index
                 AND p.replaced_by IS NULL ORDER BY p.turn_index DESC LIMIT 1) AS prev_user,
                (SELECT CASE n.role WHEN 'user' THEN n.text END FROM messages n
                 WHERE n.conversation_id = m.conversation_id AND n.turn_index > m.turn_index
                 AND n.replaced_by IS NULL AND m.replaced_by IS NULL
                 ORDER BY n.turn_index LIMIT 1) AS next_user
            FROM rewards r JOIN messages m ON m.id = r.message_id
            WHERE r.name = ? ORDER BY r.value {order}, r.message_id LIMIT ?
        """
        bottom = self._read(query.format(order="ASC"), [name, limit])
        top = self._read(query.format(order="DESC"), [name, limit])
        return bottom + top

    def training_conversations(
        self, reward_name: str = "combined", selection: Selection | None = None
    ) -> list[dict[str, Any]]:
        """Every conversation with at least one scored bot turn (of ``selection``), for a
        dataset builder, in order, replies a retry or the safety filter replaced too:
        [{"id", "platform", "ended", "turns": [{"id", "role", "author", "text", "reward",
        "cut", "replaced_by", "fallback"}]}]
        where ``reward`` is the bot turn's ``reward_name`` value (None if unscored),
        ``cut`` says the reply was stopped by the length limit or an interruption, not
        ended by the model (its generation settings record it), ``replaced_by`` the reply
        that replaced it (None on the conversation's path) and ``fallback`` that it is the
        safety filter's neutral line, not the model's."""
        chosen, params = (selection or Selection()).sql(
            "c.id IN (SELECT DISTINCT m2.conversation_id FROM messages m2 "
            "JOIN rewards r2 ON r2.message_id = m2.id AND r2.name = ?)",
            [reward_name],
        )
        rows = self._read(
            f"""
            SELECT m.id, m.conversation_id, m.role, m.author, m.text, c.platform,
                   r.value AS reward, c.ended IS NOT NULL AS ended,
                   coalesce(json_extract(m.generation, '$.cut'), 0)
                   OR coalesce(json_extract(m.generation, '$.interrupted'), 0) AS cut,
                   m.replaced_by, coalesce(json_extract(m.generation, '$.fallback'), 0) AS fallback
            FROM messages m JOIN conversations c ON c.id = m.conversation_id
            LEFT JOIN rewards r ON r.message_id = m.id AND r.name = ?
            WHERE m.conversation_id IN ({chosen})
            ORDER BY m.conversation_id, m.turn_index
            """,
            [reward_name, *params],
        )
        conversations: dict[int, dict[str, Any]] = {}
        for row in rows:
            conv = conversations.setdefault(
                row["conversation_id"],
                {
                    "id": row["conversation_id"],
                    "platform": row["platform"],
                    "ended": bool(row["ended"]),
                    "turns": [],
                },
            )
            turn = {k: row[k] for k in ("id", "role", "author", "text", "reward", "replaced_by")}
            turn |= {"cut": bool(row["cut"]), "fallback": bool(row["fallback"])}
            conv["turns"].append(turn)
        return list(conversations.values())

    def feedback_conversations(
        self, reward_name: str = "combined", platform: str = "", selection: Selection | None = None
    ) -> list[dict[str, Any]]:
        """Every conversation (of ``platform`` and ``selection``, or all), scored or not,
        for trl-style learners and export: like :meth:`training_conversations`, with the
        replies a retry replaced (``replaced_by``: the id of the reply that replaced a
        turn, None on the conversation's own turns) and ``fallback``; every turn also has
        ``votes`` (a tuple of +1/-1) and the conversation its ``external_id``."""
        selection = selection or Selection()
        if platform:
            selection = replace(selection, platform=platform)
        chosen, params = selection.sql()
        rows = self._read(
            f"""
            SELECT m.id, m.conversation_id, m.role, m.author, m.text, m.replaced_by,
                   c.platform, c.external_id, r.value AS reward,
                   coalesce(json_extract(m.generation, '$.fallback'), 0) AS fallback,
                   (SELECT GROUP_CONCAT(value) FROM votes v WHERE v.message_id = m.id) AS votes
            FROM messages m JOIN conversations c ON c.id = m.conversation_id
            LEFT JOIN rewards r ON r.message_id = m.id AND r.name = ?
            WHERE m.conversation_id IN ({chosen})
            ORDER BY m.conversation_id, m.turn_index
            """,
            [reward_name, *params],
        )
        conversations: dict[int, dict[str, Any]] = {}
        for row in rows:
            conv = conversations.setdefault(
                row["conversation_id"],
                {
                    "id": row["conversation_id"],
                    "platform": row["platform"],
                    "external_id": row["external_id"],
                    "turns": [],
                },
            )
            turn = {k: row[k] for k in ("id", "role", "author", "text", "reward", "replaced_by")}
            turn["votes"] = tuple(int(v) for v in row["votes"].split(",")) if row["votes"] else ()
            turn["fallback"] = bool(row["fallback"])
            conv["turns"].append(turn)
        return list(conversations.values())

    def snapshot(self, destination: str) -> str:
        """A consistent copy for offline work (the learner never holds a long read
        transaction on the live database)."""
        return str(self.backup(destination))


# Whether the conversation of ``messages m`` has ended (1) or is live (0).
ENDED = "(SELECT c.ended IS NOT NULL FROM conversations c WHERE c.id = m.conversation_id)"
# The conversation's end-of-chat rating answers, comma-separated (NULL if unrated).
RATING = """(SELECT overall || ',' || fluency || ',' || diversity || ',' || relatedness
    || ',' || empathy FROM ratings g WHERE g.conversation_id = m.conversation_id)"""
# The next message on the conversation's path after ``messages m`` (NULL: none yet):
# whether the user answered a bot turn, and with what.
NEXT_ON_PATH = """(SELECT x.id FROM messages x WHERE x.conversation_id = m.conversation_id
    AND x.turn_index > m.turn_index AND x.replaced_by IS NULL ORDER BY x.turn_index LIMIT 1)"""
# Whether ``messages m`` is its conversation's last bot turn on the path (the rating's).
LAST_BOT = """(m.id = (SELECT x.id FROM messages x WHERE x.conversation_id = m.conversation_id
    AND x.role = 'bot' AND x.replaced_by IS NULL ORDER BY x.turn_index DESC LIMIT 1))"""
# A bot turn's surroundings, as SQL over ``messages m``: everything its signals read
# that can change after it is logged (a reply to it or a retry of it, whether it is
# the last bot turn of a rated conversation, the conversation's end while it is
# unanswered, the rating, its votes). Stored when
# the turn is scored; any change: score it again. A turn further back is not rescored
# when a conversation grows (rewards/context.py: a signal reads the turn, what came
# before it and the message after it).
FINGERPRINT = f"""(
    COALESCE(m.replaced_by, '') || ':' || COALESCE({NEXT_ON_PATH}, '') || ':' ||
    ({LAST_BOT} AND EXISTS (SELECT 1 FROM ratings g WHERE g.conversation_id = m.conversation_id))
    || ':' ||
    (SELECT COUNT(*) || ',' || COALESCE(SUM(value), 0) || ',' || COALESCE(MAX(created), '')
     FROM votes v WHERE v.message_id = m.id) || ':' || ({NEXT_ON_PATH} IS NULL AND {ENDED})
    || ':' ||
    COALESCE((SELECT created FROM ratings g WHERE g.conversation_id = m.conversation_id), ''))"""
# Whether bot turn ``messages m`` (LEFT JOIN ``scoring s``) needs scoring by scorer
# version ``?``: never scored, scored by another version, or its surroundings changed.
NEEDS_SCORING = f"(s.message_id IS NULL OR s.scorer_version != ? OR s.fingerprint != {FINGERPRINT})"


@dataclass(frozen=True)
class Selection:
    """Which conversations a learner reads: of one ``platform`` (empty: all), started
    on or after the date ``since`` and on or before ``until`` (ISO dates, empty: no
    bound), the ``limit`` most recent of them (0: all)."""

    platform: str = ""
    since: str = ""
    until: str = ""
    limit: int = 0

    def sql(self, extra: str = "1", extra_params: Sequence = ()) -> tuple[str, list]:
        """A subquery of the chosen conversation ids (conversations aliased ``c``), and
        its parameters; ``extra`` is one more condition on ``c``."""
        until = (
            (date.fromisoformat(self.until) + timedelta(days=1)).isoformat() if self.until else ""
        )
        query = (
            "SELECT c.id FROM conversations c WHERE (? = '' OR c.platform = ?) "
            "AND (? = '' OR c.started >= ?) AND (? = '' OR c.started < ?) "
            f"AND {extra} ORDER BY c.started DESC, c.id DESC LIMIT ?"
        )
        params = [self.platform] * 2 + [self.since] * 2 + [until] * 2
        return query, [*params, *extra_params, self.limit or -1]


@dataclass(frozen=True)
class Imported:
    """One conversation from a corpus: ``turns`` are (role, author, text)."""

    external_id: str
    speaker: str  # the corpus's id of the person on the user side (stored hashed)
    turns: tuple[tuple[str, str, str], ...]
    started: str | None = None
    # self-play: the version that wrote the bot turns, and each turn's generation
    # settings (None for the user's turns), logged as a chat's bot turns are
    model_version: str | None = None
    generations: tuple[dict | None, ...] = ()
    # self-play: True on a bot turn the safety filter withdrew (replaced by the next turn)
    replaced: tuple[bool, ...] = ()


def _present(db, message_ids: set[int]) -> set[int]:
    """The ids among these that are still messages (read inside a write transaction: no
    /forget can delete one before the transaction's writes)."""
    ids = sorted(message_ids)
    present: set[int] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(f"SELECT id FROM messages WHERE id IN ({marks})", chunk)
        present.update(row[0] for row in rows)
    return present
