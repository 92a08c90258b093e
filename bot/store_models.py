"""The store's model registry: model versions, gate checks, deployments, training runs.

A mixin of :class:`bot.store.Store`, like :mod:`bot.store_data`: it uses the store's
``_write()`` transaction and ``_read()`` query helpers, and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.errors import InvalidInput, NotFound
from bot.model_files import folder_checksum
from bot.store_data import now


class ModelRegistry:
    def add_model(
        self,
        version: str,
        path: str,
        algorithm: str,
        *,
        parent: str | None = None,
        training_run_id: int | None = None,
        metrics: dict[str, Any] | None = None,
        checksum: str | None = None,
        data_snapshot: str | None = None,
    ) -> None:
        """Register a model folder; its checksum (of every file) is taken now unless given,
        so the deploy gate can tell when the folder changed since."""
        checksum = checksum or folder_checksum(Path(path))
        with self._write() as db:
            if db.execute("SELECT 1 FROM models WHERE version = ?", [version]).fetchone():
                raise InvalidInput(f"model version {version!r} already exists")
            db["models"].insert(
                {
                    "version": version,
                    "path": str(path),
                    "parent": parent,
                    "algorithm": algorithm,
                    "training_run_id": training_run_id,
                    "metrics": json.dumps(metrics or {}, sort_keys=True),
                    "created": now(),
                    "deployed": 0,
                    "checksum": checksum,
                    "data_snapshot": data_snapshot,
                }
            )

    def models(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM models ORDER BY created, rowid")
        return [{**r, "metrics": json.loads(r["metrics"] or "{}")} for r in rows]

    def model(self, version: str) -> dict[str, Any]:
        rows = self._read("SELECT * FROM models WHERE version = ?", [version])
        if not rows:
            raise NotFound(f"no model version {version!r}; `rapport models` lists them")
        return {**rows[0], "metrics": json.loads(rows[0]["metrics"] or "{}")}

    def remove_model(self, version: str) -> str:
        """Forget a version that was never deployed (its gate checks with it); return its
        folder, which stays on disk. A version in the deployment log stays: rollback may
        serve it again, and the log names it."""
        with self._write() as db:
            row = db.execute("SELECT path FROM models WHERE version = ?", [version]).fetchone()
            if not row:
                raise NotFound(f"no model version {version!r}; `rapport models` lists them")
            if db.execute(
                "SELECT 1 FROM deployments WHERE version = ? OR previous = ?", [version, version]
            ).fetchone():
                raise InvalidInput(
                    f"{version} has been deployed; it stays registered (the deployment log "
                    "and rollback name it)"
                )
            db.execute("DELETE FROM gate_checks WHERE version = ?", [version])
            db.execute("DELETE FROM models WHERE version = ?", [version])
        return row[0]

    def deployed_version(self) -> str | None:
        rows = self._read("SELECT version FROM models WHERE deployed = 1")
        return rows[0]["version"] if rows else None

    def record_gate_check(
        self, version: str, against: str | None, passed: bool, forced: bool, verdict: dict, who: str
    ) -> int:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO gate_checks (version, against, passed, forced, verdict, who, checked)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [version, against, int(passed), int(forced), json.dumps(verdict), who, now()],
            )
            return cursor.lastrowid

    def gate_checks(self, version: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE version = ?", [version]) if version else ("", [])
        rows = self._read(f"SELECT * FROM gate_checks {where} ORDER BY id", params)
        return [{**r, "verdict": json.loads(r["verdict"])} for r in rows]

    def switch_deployed(
        self,
        version: str,
        *,
        action: str,
        who: str,
        why: str = "",
        forced: bool = False,
        gate_check_id: int | None = None,
        fault: Callable[[str], None] = lambda point: None,
    ) -> str | None:
        """Make ``version`` the one deployed model and log who/when/why, in one
        transaction: a reader (or a kill at any point) sees the old state or the new one,
        never neither or both. Returns the previously deployed version. ``fault`` is
        called at named points inside the transaction (fault-injection tests)."""
        with self._write() as db:
            if not db.execute("SELECT 1 FROM models WHERE version = ?", [version]).fetchone():
                raise NotFound(f"no model version {version!r}; `rapport models` lists them")
            row = db.execute("SELECT version FROM models WHERE deployed = 1").fetchone()
            previous = row[0] if row else None
            db.execute("UPDATE models SET deployed = 0 WHERE deployed = 1")
            fault("switch-cleared")
            db.execute("UPDATE models SET deployed = 1 WHERE version = ?", [version])
            fault("switch-set")
            db.execute(
                "INSERT INTO deployments (version, previous, action, who, why, forced, "
                "gate_check_id, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [version, previous, action, who, why, int(forced), gate_check_id, now()],
            )
        return previous

    def deployments(self) -> list[dict[str, Any]]:
        return self._read("SELECT * FROM deployments ORDER BY id")

    def start_training_run(self, algorithm: str, config: dict[str, Any]) -> int:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO training_runs (algorithm, config, status, started) "
                "VALUES (?, ?, 'running', ?)",
                [algorithm, json.dumps(config, sort_keys=True), now()],
            )
            return int(cursor.lastrowid)

    def finish_training_run(
        self, run_id: int, status: str, metrics: dict[str, Any] | None = None
    ) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE training_runs SET status = ?, metrics = ?, finished = ? WHERE id = ?",
                [status, json.dumps(metrics or {}, sort_keys=True), now(), run_id],
            )
