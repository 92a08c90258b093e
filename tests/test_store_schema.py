"""Migrations: exact columns on a fresh database, idempotent re-open, upgrade from old."""

from __future__ import annotations

import sqlite3

from sqlite_utils import Database

from bot.migrations import migrations
from bot.store import Store

EXPECTED_COLUMNS = {
    "users": ["id", "platform", "created", "opted_out"],
    "conversations": [
        "id",
        "user_id",
        "platform",
        "channel",
        "started",
        "model_version",
        "external_id",
        "ended",
        "end_reason",
    ],
    "messages": [
        "id",
        "conversation_id",
        "turn_index",
        "role",
        "author",
        "user_id",
        "text",
        "created",
        "model_version",
        "generation",
        "replaced_by",
    ],
    "votes": ["id", "message_id", "user_id", "value", "created"],
    "ratings": [
        "conversation_id",
        "user_id",
        "overall",
        "fluency",
        "diversity",
        "relatedness",
        "empathy",
        "created",
    ],
    "rewards": ["message_id", "name", "value", "scorer_version", "created"],
    "training_runs": [
        "id",
        "algorithm",
        "config",
        "data_snapshot",
        "status",
        "metrics",
        "started",
        "finished",
    ],
    "scoring": ["message_id", "scorer_version", "fingerprint", "scored"],
    "reward_stats": ["name", "mean", "std", "count", "scorer_version", "updated"],
    "platform_messages": ["platform", "platform_message_id", "message_id"],
    "models": [
        "version",
        "path",
        "parent",
        "algorithm",
        "training_run_id",
        "metrics",
        "created",
        "deployed",
        "checksum",
        "data_snapshot",
    ],
    "gate_checks": ["id", "version", "against", "passed", "forced", "verdict", "who", "checked"],
    "deployments": [
        "id",
        "version",
        "previous",
        "action",
        "who",
        "why",
        "forced",
        "gate_check_id",
        "at",
    ],
}


def test_fresh_in_memory_database_has_exactly_the_expected_columns():
    store = Store(":memory:")
    tables = set(store.db.table_names()) - {"_sqlite_migrations"}
    assert tables == set(EXPECTED_COLUMNS)
    for table, columns in EXPECTED_COLUMNS.items():
        assert [c.name for c in store.db[table].columns] == columns, table
    assert store.schema_version() == (10, "m010_ratings")


def test_reopening_applies_nothing_twice(tmp_path):
    path = tmp_path / "r.db"
    Store(path).close()
    Store(path).close()
    with sqlite3.connect(path) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations ORDER BY id")]
    assert names == [
        "m001_conversations",
        "m002_votes",
        "m003_rewards",
        "m004_models",
        "m005_imports_and_scoring",
        "m006_platform_messages",
        "m007_deployments",
        "m008_conversation_ends",
        "m009_retries",
        "m010_ratings",
    ]


def test_database_from_older_schema_upgrades_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    old = Database(path)
    migrations.apply(old, stop_before="m002_votes")
    old["users"].insert({"id": "u_1", "platform": "terminal", "created": "t", "opted_out": 0})
    old["conversations"].insert({"id": 1, "user_id": "u_1", "platform": "terminal", "started": "t"})
    old["messages"].insert(
        {
            "conversation_id": 1,
            "turn_index": 0,
            "role": "bot",
            "author": "model",
            "user_id": "u_1",
            "text": "hello from an old version",
            "created": "t",
        }
    )
    old.close()

    with Store(path) as store:
        assert store.schema_version() == (10, "m010_ratings")
        assert store.messages(1)[0].text == "hello from an old version"
        store.vote(1, "u_1", 1)  # a table the old schema did not have
        assert store.votes(1) == {"u_1": 1}


def test_conversation_ends_arrive_for_finished_logs_and_leave_live_chats_open(tmp_path):
    """m008: imported and simulated conversations are finished logs (ended when they
    started); a chat of a live platform stays open until it is ended."""
    path = tmp_path / "old.db"
    old = Database(path)
    migrations.apply(old, stop_before="m008_conversation_ends")
    old["users"].insert({"id": "u_1", "platform": "x", "created": "t", "opted_out": 0})
    rows = [(1, "chitchat", "c1"), (2, "simulated", "s1"), (3, "terminal", None)]
    for cid, platform, external in rows:
        old["conversations"].insert(
            {
                "id": cid,
                "user_id": "u_1",
                "platform": platform,
                "started": "t0",
                "external_id": external,
            }
        )
    old.close()
    with Store(path) as store:
        ends = store.db.execute("SELECT id, ended, end_reason FROM conversations ORDER BY id")
        assert ends.fetchall() == [(1, "t0", "imported"), (2, "t0", "simulated"), (3, None, None)]
        store.end_conversation(3, "quit")
        store.end_conversation(3, "idle")  # the first end stands
        assert store.db.execute("SELECT end_reason FROM conversations WHERE id = 3").fetchone() == (
            "quit",
        )
