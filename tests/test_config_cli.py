"""Config layering and validation, and the `rapport` command as a user runs it."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest

from bot.config import DEFAULT_CONFIG_FILE, Config, load_config
from bot.errors import ConfigError
from bot.store import Store
from tests.conftest import run_rapport


def test_shipped_default_file_is_exactly_the_built_in_defaults():
    assert load_config(DEFAULT_CONFIG_FILE, environ={}) == Config()


def test_file_then_environment_then_flags(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[generation]\ntemperature = 0.3\ntop_p = 0.5\nmax_new_tokens = 10\n")
    config = load_config(
        path,
        overrides=["generation.max_new_tokens=20"],
        environ={"RAPPORT_GENERATION_TOP_P": "0.8", "RAPPORT_HOME": "/ignored"},
    )
    assert (config.generation.temperature, config.generation.top_p) == (0.3, 0.8)
    assert config.generation.max_new_tokens == 20
    assert config.generation.repetition_penalty == Config().generation.repetition_penalty


def test_integer_given_for_a_float_is_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[generation]\ntemperature = 1\n")
    assert load_config(path, environ={}).generation.temperature == 1.0


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[generation]\ntemperture = 0.5\n", "unknown key 'generation.temperture'"),
        ("[genration]\ntemperature = 0.5\n", "unknown section [genration]"),
        ('[generation]\ntemperature = "hot"\n', "generation.temperature must be a number"),
        ("[generation]\nmax_new_tokens = 1.5\n", "max_new_tokens must be an integer"),
        ("[generation]\nmax_new_tokens = true\n", "max_new_tokens must be an integer"),
        ("[generation]\ntop_p = 1.5\n", "top_p must be in (0, 1]"),
        ("temperature = 0.5\n", "must be a [section]"),
        ("[generation\n", "not valid TOML"),
        ("[processes]\nbatch_nice = 20\n", "processes.batch_nice must be in [0, 19]"),
        ("[processes]\nbatch_threads = -1\n", "processes.batch_threads must be in [0, "),
        ("[processes]\nserve_passive_wait = 1\n", "serve_passive_wait must be true or false"),
    ],
)
def test_bad_config_files_fail_with_one_line(tmp_path, toml, message):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    assert message in str(e.value)
    result = run_rapport("--config", str(path), "db", "status")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_environment_variable_and_flag_fail_with_one_line():
    result = run_rapport("db", "status", env={"RAPPORT_GENERATION_TOP_K": "5"})
    assert result.returncode == 1
    assert "RAPPORT_GENERATION_TOP_K: unknown key 'generation.top_k'" in result.stderr
    result = run_rapport("--set", "generation.temperature", "db", "status")
    assert "expected section.key=value" in result.stderr and result.returncode == 1


def test_every_field_has_help_text():
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help"


def test_help_lists_the_subcommands():
    result = run_rapport("--help")
    assert result.returncode == 0
    assert "db" in result.stdout
    result = run_rapport("db", "--help")
    assert "status" in result.stdout and "backup" in result.stdout


def test_db_status_prints_counts_and_schema_version(rapport_home):
    with Store(rapport_home / "rapport.db") as store:
        user = store.ensure_user("terminal", "me")
        conv = store.start_conversation(user, "terminal")
        store.add_message(conv, "user", "one")
        store.add_message(conv, "bot", "two")
    result = run_rapport("db", "status")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "schema version: 10 (m010_ratings)" in lines
    assert lines[lines.index("schema version: 10 (m010_ratings)") + 3].split() == [
        "messages",
        "2",
    ]


def test_db_backup_is_a_consistent_copy_and_never_overwrites(rapport_home, tmp_path):
    with Store(rapport_home / "rapport.db") as store:
        user = store.ensure_user("terminal", "me")
        conv = store.start_conversation(user, "terminal")
        store.add_message(conv, "user", "keep me")
    target = tmp_path / "backup.db"
    result = run_rapport("db", "backup", str(target))
    assert result.returncode == 0, result.stderr
    with Store(target, key=b"k" * 32) as copy:
        assert [m.text for m in copy.messages(conv)] == ["keep me"]
    again = run_rapport("db", "backup", str(target))
    assert again.returncode == 1 and "already exists" in again.stderr


def test_a_corrupt_database_file_is_one_readable_line(rapport_home):
    (rapport_home / "rapport.db").write_bytes(b"\x00garbage" * 1000)
    result = run_rapport("db", "status")
    assert result.returncode == 1
    assert "is not a readable rapport database" in result.stderr
    assert "Traceback" not in result.stderr
    assert (rapport_home / "rapport.db").read_bytes() == b"\x00garbage" * 1000


def test_every_command_that_writes_a_named_file_follows_one_rule(rapport_home, tmp_path):
    """export, db backup and eval --out: a missing folder is one line (nothing created),
    an existing file is kept unless --force, and --force replaces it whole."""
    with Store(rapport_home / "rapport.db") as store:
        user = store.ensure_user("terminal", "me")
        conv = store.start_conversation(user, "terminal")
        store.add_message(conv, "user", "keep me")
        store.add_message(conv, "bot", "kept")
    missing = tmp_path / "no" / "such" / "folder"
    commands = {
        "export": lambda path, *flags: ("export", str(path), "--format", "jsonl", *flags),
        "backup": lambda path, *flags: ("db", "backup", str(path), *flags),
        "eval": lambda path, *flags: ("eval", "--n", "1", "--out", str(path), *flags),
    }
    for name, command in commands.items():
        result = run_rapport(*command(missing / f"{name}.out"))
        assert result.returncode == 1, name
        assert result.stderr.strip() == (
            f"rapport: error: folder {missing} does not exist; create it first (mkdir -p {missing})"
        )
        assert not (tmp_path / "no").exists()
        existing = tmp_path / f"{name}.out"
        existing.write_text("mine")
        result = run_rapport(*command(existing))
        assert result.returncode == 1 and existing.read_text() == "mine", name
        assert result.stderr.strip() == (
            f"rapport: error: {existing} already exists; choose a new name, or --force to "
            "replace it"
        )
        assert "Traceback" not in result.stderr
    assert run_rapport(*commands["export"](tmp_path / "export.out", "--force")).returncode == 0
    assert '"keep me"' in (tmp_path / "export.out").read_text()
    assert run_rapport(*commands["backup"](tmp_path / "backup.out", "--force")).returncode == 0
    with Store(tmp_path / "backup.out", key=b"k" * 32) as copy:
        assert [m.text for m in copy.messages(conv)] == ["keep me", "kept"]
    assert not list(tmp_path.glob("*.tmp"))


def test_db_check_gives_one_verdict_line_and_fails_on_damage(rapport_home):
    db = rapport_home / "rapport.db"
    missing = run_rapport("db", "check")
    assert missing.returncode == 1 and "no database at" in missing.stderr
    with Store(db) as store:
        user = store.ensure_user("terminal", "me")
        conv = store.start_conversation(user, "terminal")
        bot = store.add_message(conv, "bot", "hello")
        store.vote(bot, user, 1)
        version, name = store.schema_version()
    healthy = run_rapport("db", "check")
    assert healthy.returncode == 0, healthy.stderr
    assert healthy.stdout.startswith(
        f"ok: integrity ok, no orphan rows, schema {version} ({name}); WAL "
    )
    raw = sqlite3.connect(db)
    raw.execute("PRAGMA foreign_keys = OFF")
    raw.execute("DELETE FROM messages WHERE id = ?", [bot])  # the vote is left orphaned
    raw.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('rapport', 'm999_from_the_future', '2027-01-01')"
    )
    raw.commit()
    raw.close()
    damaged = run_rapport("db", "check")
    assert damaged.returncode == 1
    line = damaged.stdout.strip()
    assert line.startswith("PROBLEM: orphan rows: 1 in votes; schema has migrations")
    assert "m999_from_the_future" in line and "Traceback" not in damaged.stderr
    db.write_bytes(b"\0garbage" * 512)
    for suffix in ("-wal", "-shm"):
        (rapport_home / f"rapport.db{suffix}").unlink(missing_ok=True)
    corrupt = run_rapport("db", "check")
    assert corrupt.returncode == 1
    assert corrupt.stdout.startswith(f"PROBLEM: {db} is not a readable database")
