"""The conversation store: the only code that reads or writes rapport's SQLite database.

Design
------
- One :class:`Store` a database file. Opening it applies pending migrations
  (:mod:`bot.migrations`), turns on WAL (readers never block the writer, and the writer
  never blocks readers), a busy timeout (a second writer waits for the lock instead of
  failing at once) and foreign keys.
- Every write is one transaction started with ``BEGIN IMMEDIATE``: the write lock is
  taken up front, so a read-then-write (the next turn index, a replaced vote) can never
  interleave with another process's write. When the method returns, the row is committed:
  a process killed right after ``add_message`` loses nothing. ``synchronous=NORMAL`` in
  WAL mode is durable against a killed process; only a power cut can lose the last
  commits, and it never corrupts the file.
- Platform ids (a Discord user or channel id) are never stored: users and channels are
  identified by a keyed hash (HMAC-SHA256) whose key lives in a file beside the database
  (``<db>.key``, mode 0600), so the database alone cannot be joined back to accounts.
- The log is never truncated: a 1 MB message is stored whole (model inputs are cut
  later); NUL and other control characters are stored as they are; text that is not
  valid Unicode (lone surrogates from undecodable bytes) has those code points replaced
  by U+FFFD, because SQLite text must be UTF-8 (:func:`~bot.store_data.storable`: the
  one rule, for messages and for imported platform names and ids alike).
- One store may be shared by threads (the Discord frontend runs each write in
  ``asyncio.to_thread``); a lock serialises use of the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from bot.errors import InvalidInput, NotFound, OptedOut, StoreError
from bot.files import fault_point
from bot.migrations import migrations
from bot.store_data import LearningData, now, storable
from bot.store_models import ModelRegistry
from bot.store_ratings import Ratings
from bot.store_safety import SafetyStats

ROLES = ("user", "bot")
AUTHORS = ("person", "model")
TABLES = (
    "users",
    "conversations",
    "messages",
    "votes",
    "ratings",
    "rewards",
    "scoring",
    "reward_stats",
    "platform_messages",
    "models",
    "training_runs",
)


def clean_text(text: object, what: str = "message") -> str:
    """Validate text for the log: a non-blank string, stored exactly (see module doc)."""
    if not isinstance(text, str):
        raise InvalidInput(f"{what} must be text, got {type(text).__name__}")
    if not text.strip():
        raise InvalidInput(f"{what} is empty; type something to say")
    return storable(text)


@dataclass(frozen=True)
class Message:
    id: int
    conversation_id: int
    turn_index: int
    role: str
    author: str
    user_id: str | None
    text: str
    created: str
    model_version: str | None
    generation: dict[str, Any] | None
    replaced_by: int | None = None  # the reply that replaced this one (a retry)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Message:
        generation = json.loads(row["generation"]) if row["generation"] else None
        return cls(**{**row, "generation": generation})


class Store(LearningData, ModelRegistry, Ratings, SafetyStats):
    """Open (creating and migrating if needed) the database at ``path``.

    ``path`` may be ``":memory:"`` for tests. ``key`` is the pseudonym key; by default it
    is read from (or created in) ``<path>.key``; an in-memory store gets a random one.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        busy_timeout_s: float = 30.0,
        key: bytes | None = None,
    ) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        in_memory = self.path == ":memory:"
        if not in_memory:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, timeout=busy_timeout_s, check_same_thread=False)
            self.db = Database(conn)
            self.db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if not in_memory:
                self.db.enable_wal()
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(_explain(e, self.path)) from None
        self._key = key or (secrets.token_bytes(32) if in_memory else _load_key(self.path))

    # -- plumbing -------------------------------------------------------------------

    def _migrate(self) -> None:
        # Two processes opening a new file at once: the immediate lock makes the second
        # wait, then find nothing pending.
        with self._lock:
            if migrations.pending(self.db):
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute("COMMIT")
                migrations.apply(self.db)

    @contextmanager
    def _write(self) -> Iterator[Database]:
        """One write transaction holding the write lock from its first statement."""
        with self._lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    with self.db.atomic():
                        yield self.db
                except BaseException:
                    self.db.rollback()
                    raise
                self.db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                self.db.rollback()
                raise StoreError(_explain(e, self.path)) from None

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        with self._lock:
            try:
                cursor = self.db.execute(sql, list(params))
                names = [d[0] for d in cursor.description]
                return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
            except sqlite3.DatabaseError as e:
                raise StoreError(_explain(e, self.path)) from None

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def pseudonym(self, kind: str, platform: str, platform_id: str) -> str:
        """Keyed hash of a platform id: stable for this database, not reversible."""
        digest = hmac.new(
            self._key,
            # surrogatepass: an id with a lone surrogate (an undecodable byte) still hashes
            f"{kind}\0{platform}\0{platform_id}".encode("utf-8", "surrogatepass"),
            hashlib.sha256,
        ).hexdigest()
        return f"{kind[0]}_{digest[:32]}"

    # -- users ----------------------------------------------------------------------

    def ensure_user(self, platform: str, platform_user_id: str) -> str:
        """The pseudonymous id of a platform user, creating the row on first sight."""
        user_id = self.pseudonym("user", platform, str(platform_user_id))
        with self._write() as db:
            db.execute(
                "INSERT OR IGNORE INTO users (id, platform, created, opted_out) "
                "VALUES (?, ?, ?, 0)",
                [user_id, platform, now()],
            )
        return user_id

    def user(self, user_id: str) -> dict[str, Any]:
        rows = self._read("SELECT * FROM users WHERE id = ?", [user_id])
        if not rows:
            raise NotFound(f"no user {user_id}")
        return rows[0]

    def is_opted_out(self, user_id: str) -> bool:
        rows = self._read("SELECT opted_out FROM users WHERE id = ?", [user_id])
        return bool(rows and rows[0]["opted_out"])

    def set_opt_out(self, user_id: str, opted_out: bool) -> None:
        """An opted-out user's turns are never written (``add_message`` refuses them)."""
        with self._write() as db:
            cursor = db.execute(
                "UPDATE users SET opted_out = ? WHERE id = ?", [int(opted_out), user_id]
            )
            if cursor.rowcount == 0:
                raise NotFound(f"no user {user_id}")

    def forget(self, user_id: str) -> dict[str, int]:
        """Delete everything that came from one user; return the rows deleted per table.

        That is: their conversations with every turn in them (the bot's replies were
        made from what they said), their turns and the bot's replies to them in shared
        conversations, their votes, the votes and rewards on all those messages, and the
        user row. If the user had opted out, a bare row with only the opt-out flag stays,
        so that forgetting them does not silently start logging them again.
        """
        with self._write() as db:
            row = db.execute("SELECT opted_out FROM users WHERE id = ?", [user_id]).fetchone()
            opted_out = bool(row and row[0])
            gone = (
                "(SELECT id FROM messages WHERE user_id = :u OR conversation_id IN "
                "(SELECT id FROM conversations WHERE user_id = :u))"
            )
            params = {"u": user_id}
            counts = {
                "rewards": db.execute(f"DELETE FROM rewards WHERE message_id IN {gone}", params),
                "scoring": db.execute(f"DELETE FROM scoring WHERE message_id IN {gone}", params),
                "platform_messages": db.execute(
                    f"DELETE FROM platform_messages WHERE message_id IN {gone}", params
                ),
                "votes": db.execute(
                    f"DELETE FROM votes WHERE user_id = :u OR message_id IN {gone}", params
                ),
                "ratings": db.execute(
                    "DELETE FROM ratings WHERE user_id = :u OR conversation_id IN "
                    "(SELECT id FROM conversations WHERE user_id = :u)",
                    params,
                ),
                "messages": db.execute(f"DELETE FROM messages WHERE id IN {gone}", params),
                "conversations": db.execute("DELETE FROM conversations WHERE user_id = :u", params),
                "users": db.execute("DELETE FROM users WHERE id = :u", params),
            }
            counts = {table: cursor.rowcount for table, cursor in counts.items()}
            if opted_out:
                db.execute(
                    "INSERT INTO users (id, platform, created, opted_out) "
                    "VALUES (?, 'unknown', ?, 1)",
                    [user_id, now()],
                )
        return counts

    # -- conversations and messages -------------------------------------------------

    def start_conversation(
        self,
        user_id: str,
        platform: str,
        channel: str = "",
        model_version: str | None = None,
    ) -> int:
        """A new conversation of ``user_id``; ``channel`` is a platform id, stored hashed."""
        channel_key = self.pseudonym("channel", platform, channel) if channel else None
        with self._write() as db:
            row = db.execute("SELECT opted_out FROM users WHERE id = ?", [user_id]).fetchone()
            if row is None:
                raise NotFound(f"no user {user_id}")
            if row[0]:
                raise OptedOut("you opted out of logging; nothing of yours is stored")
            cursor = db.execute(
                "INSERT INTO conversations (user_id, platform, channel, started, model_version)"
                " VALUES (?, ?, ?, ?, ?)",
                [user_id, platform, channel_key, now(), model_version],
            )
            return int(cursor.lastrowid)

    def add_message(
        self,
        conversation_id: int,
        role: str,
        text: str,
        *,
        user_id: str | None = None,
        author: str | None = None,
        model_version: str | None = None,
        generation: dict[str, Any] | None = None,
        replaces: int | None = None,
    ) -> int:
        """Append a turn to a conversation and commit it; return the message id.

        ``user_id`` defaults to the conversation's user (for a bot turn: the user it
        answers). ``author`` defaults to ``person`` for user turns and ``model`` for bot
        turns; imported corpora pass ``person`` for their "bot" side. ``replaces``: a
        retry, the id of the conversation's latest message, a bot turn, which is marked
        replaced by the new one in the same transaction.
        """
        if role not in ROLES:
            raise InvalidInput(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        author = author or ("person" if role == "user" else "model")
        if author not in AUTHORS:
            raise InvalidInput(f"author must be one of {', '.join(AUTHORS)}, got {author!r}")
        text = clean_text(text)
        generation_json = json.dumps(generation, sort_keys=True) if generation else None
        with self._write() as db:
            row = db.execute(
                "SELECT c.user_id, u.opted_out FROM conversations c "
                "JOIN users u ON u.id = c.user_id WHERE c.id = ?",
                [conversation_id],
            ).fetchone()
            if row is None:
                raise NotFound(f"no conversation {conversation_id}")
            user_id = user_id or row[0]
            if row[1] or (user_id != row[0] and self.is_opted_out(user_id)):
                raise OptedOut("you opted out of logging; nothing of yours is stored")
            (turn_index,) = db.execute(
                "SELECT COALESCE(MAX(turn_index) + 1, 0) FROM messages WHERE conversation_id = ?",
                [conversation_id],
            ).fetchone()
            if replaces is not None:
                _check_replaceable(db, replaces, conversation_id, turn_index, role)
            cursor = db.execute(
                "INSERT INTO messages (conversation_id, turn_index, role, author, user_id, "
                "text, created, model_version, generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    conversation_id,
                    turn_index,
                    role,
                    author,
                    user_id,
                    text,
                    now(),
                    model_version,
                    generation_json,
                ],
            )
            if replaces is not None:
                db.execute(
                    "UPDATE messages SET replaced_by = ? WHERE id = ?", [cursor.lastrowid, replaces]
                )
            return int(cursor.lastrowid)

    def message(self, message_id: int) -> Message:
        rows = self._read("SELECT * FROM messages WHERE id = ?", [message_id])
        if not rows:
            raise NotFound(f"no message {message_id}")
        return Message.from_row(rows[0])

    def messages(self, conversation_id: int) -> list[Message]:
        rows = self._read(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY turn_index",
            [conversation_id],
        )
        return [Message.from_row(r) for r in rows]

    def conversation(self, conversation_id: int) -> dict[str, Any]:
        rows = self._read("SELECT * FROM conversations WHERE id = ?", [conversation_id])
        if not rows:
            raise NotFound(f"no conversation {conversation_id}")
        return rows[0]

    # -- votes ----------------------------------------------------------------------

    def vote(self, message_id: int, user_id: str, value: int) -> None:
        """Record +1/-1 by ``user_id`` on a bot message; 0 withdraws their vote.

        A later vote by the same user on the same message replaces the earlier one.
        """
        if value not in (-1, 0, 1) or isinstance(value, bool):
            raise InvalidInput(f"a vote is +1, -1 or 0 (withdraw), got {value!r}")
        with self._write() as db:
            row = db.execute("SELECT role FROM messages WHERE id = ?", [message_id]).fetchone()
            if row is None:
                raise NotFound(f"no message {message_id} to vote on")
            if row[0] != "bot":
                raise InvalidInput(
                    f"message {message_id} is a user turn; only bot replies take votes"
                )
            opted = db.execute("SELECT opted_out FROM users WHERE id = ?", [user_id]).fetchone()
            if opted is None:
                raise NotFound(f"no user {user_id}")
            if opted[0]:
                raise OptedOut("you opted out of logging; your votes are not stored")
            if value == 0:
                db.execute(
                    "DELETE FROM votes WHERE message_id = ? AND user_id = ?", [message_id, user_id]
                )
                return
            db.execute(
                "INSERT INTO votes (message_id, user_id, value, created) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (message_id, user_id) DO UPDATE SET "
                "value = excluded.value, created = excluded.created",
                [message_id, user_id, value, now()],
            )

    def link_platform_message(self, platform: str, platform_ids: list[str], message_id: int):
        """Record the platform messages that carried a bot turn."""
        with self._write() as db:
            db.conn.executemany(
                "INSERT OR REPLACE INTO platform_messages (platform, platform_message_id, "
                "message_id) VALUES (?, ?, ?)",
                [(platform, str(pid), message_id) for pid in platform_ids],
            )

    def message_for_platform(self, platform: str, platform_id: str) -> int | None:
        rows = self._read(
            "SELECT message_id FROM platform_messages WHERE platform = ? "
            "AND platform_message_id = ?",
            [platform, str(platform_id)],
        )
        return rows[0]["message_id"] if rows else None

    def votes(self, message_id: int) -> dict[str, int]:
        rows = self._read("SELECT user_id, value FROM votes WHERE message_id = ?", [message_id])
        return {r["user_id"]: r["value"] for r in rows}

    # -- maintenance ----------------------------------------------------------------

    def schema_version(self) -> tuple[int, str | None]:
        applied = migrations.applied(self.db)
        return len(applied), (applied[-1].name if applied else None)

    def counts(self) -> dict[str, int]:
        return {t: self._read(f"SELECT COUNT(*) AS n FROM {t}")[0]["n"] for t in TABLES}

    def backup(self, destination: str | Path, replace: bool = False) -> Path:
        """A consistent copy of the live database (``VACUUM INTO``), safe while bots run.
        ``replace``: write beside an existing file, then swap it in (a kill keeps the old)."""
        destination = Path(destination).expanduser()
        if destination.exists() and not replace:
            raise StoreError(f"{destination} already exists; choose a new file name")
        tmp = destination.with_name(destination.name + ".tmp")
        tmp.unlink(missing_ok=True)
        with self._lock:
            try:
                self.db.execute("VACUUM INTO ?", [str(tmp)])
            except sqlite3.DatabaseError as e:
                tmp.unlink(missing_ok=True)
                raise StoreError(_explain(e, str(destination))) from None
        fault_point("backup-written")
        os.replace(tmp, destination)
        return destination


def _check_replaceable(
    db: Database, message_id: int, conversation_id: int, turn_index: int, role: str
):
    """A retry replaces the latest turn of its conversation, a bot turn, with a bot turn."""
    row = db.execute(
        "SELECT conversation_id, turn_index, role, replaced_by FROM messages WHERE id = ?",
        [message_id],
    ).fetchone()
    if row is None:
        raise NotFound(f"no message {message_id} to replace")
    if role != "bot" or row[2] != "bot" or row[3] is not None:
        raise InvalidInput(f"message {message_id} is not a reply that can be retried")
    if row[0] != conversation_id or row[1] != turn_index - 1:
        raise InvalidInput("only the latest reply of a conversation can be retried")


def _load_key(db_path: str) -> bytes:
    """The pseudonym key beside the database, created (0600) on first use."""
    key_path = Path(db_path + ".key")
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = key_path.read_bytes()
        if len(key) < 32:
            raise StoreError(
                f"pseudonym key {key_path} is damaged; restore it from a backup"
            ) from None
        return key
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
        f.flush()
        os.fsync(f.fileno())
    return key_path.read_bytes()


def _explain(error: sqlite3.DatabaseError, path: str) -> str:
    text = str(error)
    if "locked" in text or "busy" in text:
        return f"the database {path} is locked by another process; try again in a moment"
    if "not a database" in text or "malformed" in text:
        return (
            f"{path} is not a readable rapport database ({text}); "
            "move it aside or restore a backup (rapport db backup)"
        )
    if "readonly" in text or "unable to open" in text:
        return f"cannot write the database {path} ({text}); check the folder's permissions"
    return f"database error on {path}: {text}"
