"""``rapport db check``: is the database whole? Read-only: it never migrates or writes.

Four questions, one verdict line: SQLite's own ``integrity_check``; orphan rows (a row
whose message, conversation or user is gone: ``foreign_key_check`` over every declared
reference); the schema version against the migrations this rapport knows (a database
from a newer rapport is flagged, one from an older is migrated by the next command that
opens it); and the size of the write-ahead log, which a reader that never lets go keeps
from being folded back into the database.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from bot.migrations import migrations

# A WAL this large means checkpoints are not keeping up (SQLite folds it back at 4 MB
# by default when no reader holds it open).
WAL_WARN_BYTES = 64 * 1024 * 1024


@dataclass
class Health:
    path: str
    integrity: list[str] = field(default_factory=list)  # empty: ok
    orphans: dict[str, int] = field(default_factory=dict)  # table -> rows
    schema: int = 0
    schema_name: str | None = None
    unknown_migrations: list[str] = field(default_factory=list)  # from a newer rapport
    pending_migrations: int = 0
    wal_bytes: int = 0

    @property
    def problems(self) -> list[str]:
        out = []
        if self.integrity:
            out.append(f"integrity check failed ({self.integrity[0]})")
        if self.orphans:
            rows = ", ".join(f"{n} in {t}" for t, n in sorted(self.orphans.items()))
            out.append(f"orphan rows: {rows}")
        if self.unknown_migrations:
            out.append(
                f"schema has migrations this rapport does not know "
                f"({', '.join(self.unknown_migrations)}): upgrade rapport"
            )
        return out

    def verdict(self) -> str:
        wal = f"WAL {self.wal_bytes / 1e6:.1f} MB"
        if self.wal_bytes > WAL_WARN_BYTES:
            wal += " (large: a reader is holding it open?)"
        schema = f"schema {self.schema} ({self.schema_name or 'empty'})"
        if self.pending_migrations:
            schema += f", {self.pending_migrations} migration(s) pending (applied on next open)"
        if self.problems:
            return f"PROBLEM: {'; '.join(self.problems)}; {schema}; {wal}"
        return f"ok: integrity ok, no orphan rows, {schema}; {wal}"


def check(path: str | Path) -> Health:
    """The health of the database at ``path``, opened read-only. Raises
    ``sqlite3.DatabaseError`` when the file is not a database at all."""
    path = Path(path)
    health = Health(str(path))
    wal = Path(str(path) + "-wal")
    health.wal_bytes = wal.stat().st_size if wal.exists() else 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        rows = [r[0] for r in db.execute("PRAGMA integrity_check")]
        health.integrity = [] if rows == ["ok"] else rows
        for table, *_ in db.execute("PRAGMA foreign_key_check"):
            health.orphans[table] = health.orphans.get(table, 0) + 1
        applied = _applied(db)
        known = [m.name for m in migrations._migrations]
        health.schema = len(applied)
        health.schema_name = applied[-1] if applied else None
        health.unknown_migrations = [name for name in applied if name not in known]
        health.pending_migrations = len([name for name in known if name not in applied])
    finally:
        db.close()
    return health


def _applied(db: sqlite3.Connection) -> list[str]:
    table = migrations.migrations_table
    exists = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [table]
    ).fetchone()
    if not exists:
        return []
    return [
        r[0]
        for r in db.execute(
            f"SELECT name FROM [{table}] WHERE migration_set = ? ORDER BY rowid",
            [migrations.name],
        )
    ]
