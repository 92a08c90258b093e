"""Schema migrations of the conversation store, in the order they were written.

One small function a change; an applied migration is never edited (add a new one).
:class:`bot.store.Store` applies the pending ones every time it opens a database, and the
number of applied migrations is the schema version shown by ``rapport db status``.

Tables (DESIGN.md, "Storage"):

- ``users``: a pseudonymous id (keyed hash of the platform id; the platform id itself is
  never stored), the platform, the opt-out flag.
- ``conversations``: who, where (keyed hash of the channel), when, which model version.
- ``messages``: one row a turn; ``role`` is ``user`` or ``bot``; ``author`` says whether
  a person or a model wrote it (imported corpora have human-written "bot" turns); bot turns
  carry the model version and the generation settings (JSON); a bot turn the user
  retried names the reply that replaced it (``replaced_by``).
- ``votes``: +1/-1 by one user on one bot message; a later vote replaces the earlier.
- ``rewards``: one value per (message, reward name) with the scorer version.
- ``ratings``: one end-of-chat rating set (1-5 per question) per conversation.
- ``models``, ``training_runs``: model versions and the runs that made them.
"""

from __future__ import annotations

from sqlite_utils import Database, Migrations

migrations = Migrations("rapport")


@migrations()
def m001_conversations(db: Database) -> None:
    db["users"].create(
        {"id": str, "platform": str, "created": str, "opted_out": int},
        pk="id",
        not_null={"platform", "created", "opted_out"},
        defaults={"opted_out": 0},
    )
    db["conversations"].create(
        {
            "id": int,
            "user_id": str,
            "platform": str,
            "channel": str,
            "started": str,
            "model_version": str,
        },
        pk="id",
        not_null={"user_id", "platform", "started"},
        foreign_keys=[("user_id", "users", "id")],
    )
    db["conversations"].create_index(["user_id"])
    db["messages"].create(
        {
            "id": int,
            "conversation_id": int,
            "turn_index": int,
            "role": str,
            "author": str,
            "user_id": str,
            "text": str,
            "created": str,
            "model_version": str,
            "generation": str,
        },
        pk="id",
        not_null={"conversation_id", "turn_index", "role", "author", "text", "created"},
        foreign_keys=[("conversation_id", "conversations", "id"), ("user_id", "users", "id")],
    )
    db["messages"].create_index(["conversation_id", "turn_index"], unique=True)
    db["messages"].create_index(["user_id"])


@migrations()
def m002_votes(db: Database) -> None:
    db["votes"].create(
        {"id": int, "message_id": int, "user_id": str, "value": int, "created": str},
        pk="id",
        not_null={"message_id", "user_id", "value", "created"},
        foreign_keys=[("message_id", "messages", "id"), ("user_id", "users", "id")],
    )
    # One vote per user per message: a later vote replaces the earlier one.
    db["votes"].create_index(["message_id", "user_id"], unique=True)
    db["votes"].create_index(["user_id"])


@migrations()
def m003_rewards(db: Database) -> None:
    db["rewards"].create(
        {"message_id": int, "name": str, "value": float, "scorer_version": str, "created": str},
        pk=("message_id", "name"),
        not_null={"value", "scorer_version", "created"},
        foreign_keys=[("message_id", "messages", "id")],
    )
    db["rewards"].create_index(["name"])


@migrations()
def m004_models(db: Database) -> None:
    db["training_runs"].create(
        {
            "id": int,
            "algorithm": str,
            "config": str,
            "data_snapshot": str,
            "status": str,
            "metrics": str,
            "started": str,
            "finished": str,
        },
        pk="id",
        not_null={"algorithm", "config", "status", "started"},
    )
    db["models"].create(
        {
            "version": str,
            "path": str,
            "parent": str,
            "algorithm": str,
            "training_run_id": int,
            "metrics": str,
            "created": str,
            "deployed": int,
        },
        pk="version",
        not_null={"path", "algorithm", "created", "deployed"},
        defaults={"deployed": 0},
        foreign_keys=[("training_run_id", "training_runs", "id")],
    )


@migrations()
def m005_imports_and_scoring(db: Database) -> None:
    # Imported conversations keep their corpus id, so a re-import skips them.
    db["conversations"].add_column("external_id", str)
    db["conversations"].create_index(["platform", "external_id"], unique=True)
    # Which version of the scorer last scored a bot turn, and what the turn's
    # surroundings looked like then (conversation length, votes): a later user reply
    # or vote changes the fingerprint and the turn is scored again.
    db["scoring"].create(
        {"message_id": int, "scorer_version": str, "fingerprint": str, "scored": str},
        pk="message_id",
        not_null={"scorer_version", "fingerprint", "scored"},
        foreign_keys=[("message_id", "messages", "id")],
    )
    # Normalisation statistics of each signal over the scored logs.
    db["reward_stats"].create(
        {
            "name": str,
            "mean": float,
            "std": float,
            "count": int,
            "scorer_version": str,
            "updated": str,
        },
        pk="name",
        not_null={"mean", "std", "count", "scorer_version", "updated"},
    )


@migrations()
def m006_platform_messages(db: Database) -> None:
    # The platform's ids of the messages that carried a bot turn (a long reply is split
    # into several Discord messages), so a reaction on any of them is a vote on the turn.
    db["platform_messages"].create(
        {"platform": str, "platform_message_id": str, "message_id": int},
        pk=("platform", "platform_message_id"),
        foreign_keys=[("message_id", "messages", "id")],
    )
    db["platform_messages"].create_index(["message_id"])


@migrations()
def m007_deployments(db: Database) -> None:
    # What the gate checks a model folder against, and where its data came from.
    db["models"].add_column("checksum", str)
    db["models"].add_column("data_snapshot", str)
    # At most one deployed version, enforced by SQLite itself.
    db.execute("CREATE UNIQUE INDEX idx_models_one_deployed ON models(deployed) WHERE deployed = 1")
    # Every gate verdict, passed or not, with its numbers.
    db["gate_checks"].create(
        {
            "id": int,
            "version": str,
            "against": str,
            "passed": int,
            "forced": int,
            "verdict": str,
            "who": str,
            "checked": str,
        },
        pk="id",
        not_null={"version", "passed", "forced", "verdict", "checked"},
        foreign_keys=[("version", "models", "version")],
    )
    # Every switch of the deployed version: who, when, why, and from which version.
    db["deployments"].create(
        {
            "id": int,
            "version": str,
            "previous": str,
            "action": str,
            "who": str,
            "why": str,
            "forced": int,
            "gate_check_id": int,
            "at": str,
        },
        pk="id",
        not_null={"version", "action", "who", "forced", "at"},
        foreign_keys=[("version", "models", "version"), ("gate_check_id", "gate_checks", "id")],
    )


@migrations()
def m008_conversation_ends(db: Database) -> None:
    # A conversation's end: when and why (new, quit, eof, idle, imported, simulated).
    # NULL while it is live: a bot turn with no user reply yet is not "the user left".
    db["conversations"].add_column("ended", str)
    db["conversations"].add_column("end_reason", str)
    # Corpora and self-play are finished logs; live chats end when `rapport score` finds
    # them idle (scoring.idle_minutes) or their platform ends them.
    db.execute(
        "UPDATE conversations SET ended = started, end_reason = "
        "CASE platform WHEN 'simulated' THEN 'simulated' ELSE 'imported' END "
        "WHERE external_id IS NOT NULL"
    )


@migrations()
def m009_retries(db: Database) -> None:
    # A reply the user asked to retry (/retry, 🔁) stays in the log, pointing at the reply
    # that replaced it; the conversation as the bot and the learner see it is the turns
    # no reply replaced. (kept, replaced) is a preference pair.
    db["messages"].add_column("replaced_by", int, fk="messages", fk_col="id")


@migrations()
def m010_ratings(db: Database) -> None:
    # End-of-chat ratings, 1-5, on the questions of the human evaluation of Jaques et al.
    # 2019; one set per conversation (a second rating replaces the first).
    db["ratings"].create(
        {
            "conversation_id": int,
            "user_id": str,
            "overall": int,
            "fluency": int,
            "diversity": int,
            "relatedness": int,
            "empathy": int,
            "created": str,
        },
        pk="conversation_id",
        not_null={
            "user_id",
            "overall",
            "fluency",
            "diversity",
            "relatedness",
            "empathy",
            "created",
        },
        foreign_keys=[("conversation_id", "conversations", "id"), ("user_id", "users", "id")],
    )
