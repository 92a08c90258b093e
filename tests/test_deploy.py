"""Deploy: registry, gate, atomic switch, rollback, hot reload in a running chat, retrain."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from bot.config import load_config
from bot.loop.gate import sane, threshold_checks
from bot.loop.registry import (
    base_version,
    deploy,
    deployment_stack,
    rollback,
    switch,
)
from bot.model_files import ModelRejected
from bot.store import Store
from bot.store_data import Imported
from tests.conftest import run_rapport
from tests.tiny_models import LOOSE_GATE


@pytest.fixture
def env(tiny_model_dir, monkeypatch):
    """The tiny model as the base, and the loose gate, for in-process and CLI runs."""
    values = {**LOOSE_GATE, "RAPPORT_MODEL_PATH": str(tiny_model_dir)}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def add_version(store: Store, tiny_model_dir, tmp_path, name: str, noise: float = 0.0) -> str:
    """A copy of the tiny model (optionally with perturbed weights) registered as ``name``."""
    folder = tmp_path / name
    if noise:
        from bot.policy import load_model

        model, tokenizer = load_model(tiny_model_dir)
        torch.manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    else:
        shutil.copytree(tiny_model_dir, folder)
    store.add_model(name, str(folder), "psi", parent="tiny")
    return name


def serve(store: Store, version: str) -> None:
    """Deploy without the gate (setup for tests of what comes after a deploy)."""
    switch(
        store, version, base=base_version(store, load_config()), action="deploy", who="t", why=""
    )


def deployed_rows(db) -> list[str]:
    with Store(db) as store:
        return [m["version"] for m in store.models() if m["deployed"]]


def test_sanity_check_on_labelled_replies():
    good = ["Sounds fun! What kind of puppy?", "¡Muy bien, gracias!", "I'm good 😂 you?"]
    bad = ["", "…", "the the the the the the the", "😂😂😂😂", "<|im_start|>user", "12345 6789"]
    assert [sane(r) for r in good] == [True] * 3
    assert [sane(r) for r in bad] == [False] * 6


def cell(value, low=None, high=None):
    return {
        "value": value,
        "low": value if low is None else low,
        "high": value if high is None else high,
    }


def eval_row(combined=0.0, kl=0.1, distinct_2=0.8, question=0.3, repeated=0.0, repetition=-0.1):
    return {
        "combined": cell(combined, combined - 0.1, combined + 0.1),
        "kl_to_prior": cell(kl),
        "distinct_2": cell(distinct_2),
        "bot_question": cell(question),
        "repeated_replies": cell(repeated),
        "bot_repetition": cell(repetition, repetition - 0.05, repetition + 0.05),
    }


def test_thresholds_catch_the_exploit_collapse_and_pass_a_healthy_candidate():
    gate = load_config(environ={}).gate
    served = eval_row()
    healthy = threshold_checks({"new": eval_row(combined=0.05), "old": served}, "new", "old", gate)
    assert all(c["passed"] for c in healthy)
    collapsed = eval_row(combined=0.5, kl=2.5, distinct_2=0.2, question=1.0, repeated=0.8)
    failed = {
        c["name"]
        for c in threshold_checks({"new": collapsed, "old": served}, "new", "old", gate)
        if not c["passed"]
    }
    assert failed == {"kl_to_prior", "diversity", "question_rate", "repeated_replies"}
    worse = eval_row(combined=-1.0, repetition=-0.6)
    failed = {
        c["name"]
        for c in threshold_checks({"new": worse, "old": served}, "new", "old", gate)
        if not c["passed"]
    }
    assert failed == {"elicited_reward", "repetition"}
    # a served model that already asks in every turn: a candidate that asks no more is not
    # refused for it, and the verdict says why; one that asks more than the bound is
    asking = eval_row(question=1.0)
    checks = threshold_checks({"new": eval_row(question=1.0), "old": asking}, "new", "old", gate)
    (rate,) = [c for c in checks if c["name"] == "question_rate"]
    assert rate["passed"] and rate["detail"] == (
        "1.00, above the bound 0.9 but not above the deployed 1.00"
    )
    checks = threshold_checks({"new": eval_row(question=0.95), "old": served}, "new", "old", gate)
    (rate,) = [c for c in checks if c["name"] == "question_rate"]
    assert not rate["passed"] and rate["detail"].endswith(
        f"and the deployed {served['bot_question']['value']:.2f}"
    )


def test_deploy_records_who_when_why_and_models_lists_the_gate(
    env, tiny_model_dir, tmp_path, rapport_home
):
    with Store(rapport_home / "rapport.db") as store:
        add_version(store, tiny_model_dir, tmp_path, "v1")
    before = run_rapport("models").stdout.splitlines()
    # before any deploy the base model is what bots serve, and is marked so
    assert before[1].startswith(f"* {tiny_model_dir} ") and " base " in before[1]
    assert before[2].startswith("  v1 ")
    result = run_rapport("deploy", "v1", "--why", "first try", "--who", "ann", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "deployed v1;" in result.stdout
    assert "pass  kl_to_prior" in result.stdout
    with Store(rapport_home / "rapport.db") as store:
        log = [(d["action"], d["version"], d["previous"], d["who"]) for d in store.deployments()]
        assert log == [
            ("initial", str(tiny_model_dir), None, "ann"),
            ("deploy", "v1", str(tiny_model_dir), "ann"),
        ]
        assert store.deployments()[-1]["why"] == "first try"
        (check,) = store.gate_checks("v1")
        assert check["passed"] == 1 and check["against"] == str(tiny_model_dir)
    listing = run_rapport("models")
    assert listing.returncode == 0, listing.stderr
    (row,) = [line for line in listing.stdout.splitlines() if " v1 " in line]
    assert row.startswith("* v1") and "passed" in row


def test_bad_folders_and_failed_thresholds_are_refused_in_one_line(
    env, tiny_model_dir, tmp_path, rapport_home
):
    db = rapport_home / "rapport.db"
    with Store(db) as store:
        add_version(store, tiny_model_dir, tmp_path, "v1")
        serve(store, "v1")
        add_version(store, tiny_model_dir, tmp_path, "missing")
        add_version(store, tiny_model_dir, tmp_path, "corrupt")
        add_version(store, tiny_model_dir, tmp_path, "drifted", noise=0.5)
    (tmp_path / "missing" / "config.json").unlink()
    weights = tmp_path / "corrupt" / "model.safetensors"
    weights.write_bytes(b"\0garbage" + weights.read_bytes()[8:])
    cases = {
        "missing": "rapport: error: refused missing: "
        f"{tmp_path / 'missing'} is missing config.json",
        "corrupt": "rapport: error: refused corrupt: the files in "
        f"{tmp_path / 'corrupt'} changed since it was registered (checksum mismatch)",
    }
    for version, line in cases.items():
        result = run_rapport("deploy", version, timeout=300)
        assert result.returncode == 1
        assert result.stderr.strip() == line
    strict = run_rapport(
        "deploy", "drifted", env={"RAPPORT_GATE_MAX_KL_TO_PRIOR": "0.001"}, timeout=300
    )
    assert strict.returncode == 1
    # the one error line (a first eval in a fresh home also says it converts MiniLM)
    errors = [x for x in strict.stderr.splitlines() if x.startswith("rapport: error:")]
    (line,) = errors
    assert strict.stderr.strip().endswith(line)
    assert line.startswith("rapport: error: refused drifted: failed kl_to_prior")
    assert line.endswith("v1 stays deployed")
    assert deployed_rows(db) == ["v1"]
    with Store(db) as store:  # the refused verdict is kept, with its numbers
        (check,) = store.gate_checks("drifted")
        assert check["passed"] == 0
        kl = next(c for c in check["verdict"]["checks"] if c["name"] == "kl_to_prior")
        assert not kl["passed"] and "nats/token" in kl["detail"]


def test_a_registered_folder_that_does_not_load_is_refused(
    env, tiny_model_dir, tmp_path, rapport_home
):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with Store(rapport_home / "rapport.db") as store:
        store.add_model("broken", str(folder), "psi")  # checksum of the broken files
        with pytest.raises(ModelRejected, match="refused broken: it does not load"):
            deploy(store, load_config(), "broken", who="t", why="")
        assert store.deployed_version() is None


def test_force_deploys_past_a_failed_gate_and_is_logged_as_forced(
    env, tiny_model_dir, tmp_path, rapport_home
):
    with Store(rapport_home / "rapport.db") as store:
        add_version(store, tiny_model_dir, tmp_path, "drifted", noise=0.5)
    result = run_rapport(
        "deploy", "drifted", "--force", env={"RAPPORT_GATE_MAX_KL_TO_PRIOR": "0.001"}, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "FORCED" in result.stdout
    with Store(rapport_home / "rapport.db") as store:
        assert store.deployed_version() == "drifted"
        assert store.deployments()[-1]["forced"] == 1
        assert store.gate_checks("drifted")[0]["forced"] == 1
    assert "forced" in run_rapport("models").stdout
    log = run_rapport("models", "log").stdout.splitlines()
    assert "deploy   drifted (was " in log[-1] and log[-1].endswith("FORCED")


@pytest.mark.parametrize(
    "point, survivor",
    [
        ("before-switch", "v1"),
        ("switch-cleared", "v1"),
        ("switch-set", "v1"),
        ("after-switch", "v2"),
    ],
)
def test_sigkill_during_deploy_leaves_exactly_one_deployed_version(
    env, tiny_model_dir, tmp_path, rapport_home, point, survivor
):
    db = rapport_home / "rapport.db"
    with Store(db) as store:
        add_version(store, tiny_model_dir, tmp_path, "v1")
        add_version(store, tiny_model_dir, tmp_path, "v2")
        serve(store, "v1")
    result = run_rapport("deploy", "v2", env={"RAPPORT_FAULT_POINT": point}, timeout=300)
    assert result.returncode == -signal.SIGKILL
    assert deployed_rows(db) == [survivor]
    with Store(db) as store:  # the log agrees with the flag
        assert deployment_stack(store)[-1] == survivor
    again = run_rapport("deploy", "v2", timeout=300) if survivor == "v1" else None
    assert again is None or again.returncode == 0, again.stderr
    assert deployed_rows(db) == ["v2"]


def test_sigkill_during_rollback_leaves_exactly_one_deployed_version(
    env, tiny_model_dir, tmp_path, rapport_home
):
    db = rapport_home / "rapport.db"
    with Store(db) as store:
        for name in ("v1", "v2"):
            add_version(store, tiny_model_dir, tmp_path, name)
            serve(store, name)
    killed = run_rapport("rollback", env={"RAPPORT_FAULT_POINT": "switch-set"})
    assert killed.returncode == -signal.SIGKILL
    assert deployed_rows(db) == ["v2"]
    result = run_rapport("rollback", "--why", "bad replies")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "rolled back from v2 to v1"
    assert deployed_rows(db) == ["v1"]


def test_rollback_walks_back_through_the_deploys(env, tiny_model_dir, tmp_path, rapport_home):
    with Store(rapport_home / "rapport.db") as store:
        config = load_config()
        for name in ("v1", "v2", "v3"):
            add_version(store, tiny_model_dir, tmp_path, name)
            serve(store, name)
        assert rollback(store, config, who="t", why="") == ("v3", "v2")
        assert rollback(store, config, who="t", why="") == ("v2", "v1")
        assert rollback(store, config, who="t", why="") == ("v1", str(tiny_model_dir))
        with pytest.raises(Exception, match="nothing to roll back to"):
            rollback(store, config, who="t", why="")
        assert store.deployed_version() == str(tiny_model_dir)


class Chat:
    """A running `rapport chat` in pipe mode: one line in, one reply line out."""

    def __init__(self, env) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot.loop.cli", "chat", "--user", "tester"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )

    def say(self, text: str) -> str:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def close(self) -> str:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        return self.proc.stderr.read()


def test_a_running_chat_follows_deploys_and_rollbacks(env, tiny_model_dir, tmp_path, rapport_home):
    db = rapport_home / "rapport.db"
    with Store(db) as store:
        config = load_config()
        for name in ("v1", "v2", "broken"):
            add_version(store, tiny_model_dir, tmp_path, name)
        serve(store, "v1")
        chat = Chat(env)
        try:
            assert chat.say("hello")
            deploy(store, config, "v2", who="t", why="")
            assert chat.say("still there?")
            rollback(store, config, who="t", why="")
            assert chat.say("and now?")
            serve(store, "broken")
            (tmp_path / "broken" / "model.safetensors").write_bytes(b"corrupted after deploy")
            assert chat.say("are you ok?")
        finally:
            stderr = chat.close()
        assert chat.proc.returncode == 0, stderr
        versions = [
            r[0]
            for r in store.db.execute(
                "SELECT model_version FROM messages WHERE role = 'bot' ORDER BY id"
            )
        ]
    assert versions == ["v1", "v2", "v1", "v1"]
    assert "now serving v2" in stderr and "now serving v1" in stderr
    assert "could not load broken" in stderr and "still serving v1" in stderr


def test_retrain_runs_the_whole_loop_on_a_tiny_model(env, tiny_model_dir, rapport_home):
    conversations = [
        Imported(
            f"c{i}",
            "tester",
            (
                ("user", "person", f"I just adopted puppy number {i}!"),
                ("bot", "model", "Congrats! What breed is your dog?"),
                ("user", "person", "hahaha a corgi, I love him so much"),
                ("bot", "model", "Corgis are lovely. Do you walk him every day?"),
                ("user", "person", "yes twice a day"),
            ),
        )
        for i in range(6)
    ]
    with Store(rapport_home / "rapport.db") as store:
        store.import_conversations("jsonl", conversations)
    result = run_rapport("retrain", "--algo", "psi", "--steps", "2", timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "1/3 scored 12 new bot turns"
    assert lines[1].startswith("2/3 trained psi-")
    assert lines[-1].startswith("3/3 deployed psi-")
    version = lines[1].split()[2]
    with Store(rapport_home / "rapport.db") as store:
        row = store.model(version)
        assert row["deployed"] == 1 and row["parent"] == str(tiny_model_dir)
        assert row["data_snapshot"] and row["checksum"]
        assert store.gate_checks(version)[0]["passed"] == 1


def test_a_reply_being_written_finishes_on_the_model_it_started_with(
    env, tiny_model_dir, tmp_path, rapport_home
):
    from bot.loop.registry import DeployedPolicy
    from bot.session import Session

    with Store(rapport_home / "rapport.db") as store:
        for name in ("v1", "v2"):
            add_version(store, tiny_model_dir, tmp_path, name)
        serve(store, "v1")
        source = DeployedPolicy(store, load_config(), seed=0)
        session = Session(store, source, platform="terminal", platform_user_id="u", channel="t")
        deployed_mid_reply = []

        def on_text(piece: str) -> None:
            if not deployed_mid_reply:  # a deploy lands while the reply is streaming
                serve(store, "v2")
                deployed_mid_reply.append(piece)

        first = session.respond("tell me something", on_text=on_text)
        second = session.respond("and again")
        assert deployed_mid_reply
        assert (first.model_version, second.model_version) == ("v1", "v2")
        logged = [
            r[0]
            for r in store.db.execute(
                "SELECT model_version FROM messages WHERE role = 'bot' ORDER BY id"
            )
        ]
        assert logged == ["v1", "v2"]


def test_a_refused_models_add_leaves_no_row_and_remove_frees_a_never_deployed_name(
    env, tiny_model_dir, tmp_path, rapport_home
):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").unlink()
    refused = run_rapport("models", "add", str(broken), "--version", "mine")
    assert refused.returncode == 1
    line = f"rapport: error: refused mine: {broken} is missing config.json"
    assert refused.stderr.strip() == line
    with Store(rapport_home / "rapport.db") as store:
        assert store.models() == []  # the name is still free
    good = tmp_path / "good"
    shutil.copytree(tiny_model_dir, good)
    assert run_rapport("models", "add", str(good), "--version", "mine").returncode == 0
    with Store(rapport_home / "rapport.db") as store:
        add_version(store, tiny_model_dir, tmp_path, "v1")
        serve(store, "v1")
        store.record_gate_check("mine", "v1", False, False, {"checks": []}, "t")
    for version, line in {
        "v1": "v1 has been deployed; it stays registered",
        "nope": "no model version 'nope'",
    }.items():
        result = run_rapport("models", "remove", version)
        assert result.returncode == 1 and line in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    removed = run_rapport("models", "remove", "mine")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.strip() == f"removed mine; its files stay in {good}"
    assert (good / "model.safetensors").exists()
    with Store(rapport_home / "rapport.db") as store:
        assert "mine" not in {m["version"] for m in store.models()}
        assert store.gate_checks("mine") == []
    assert run_rapport("models", "add", str(good), "--version", "mine").returncode == 0


def test_models_compare_shows_both_versions_answering_the_same_openers_with_rewards(
    env, tiny_model_dir, tmp_path, rapport_home
):
    with Store(rapport_home / "rapport.db") as store:
        add_version(store, tiny_model_dir, tmp_path, "v1")
        add_version(store, tiny_model_dir, tmp_path, "v2", noise=0.5)
    result = run_rapport("models", "compare", "v2", "v1", "--n", "2", timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [x for x in result.stdout.splitlines() if x]
    assert len(lines) == 2 * 5  # per opener: the user's line, then each reply and its rewards
    for k in (0, 5):
        assert lines[k].startswith("user: ")
        assert lines[k + 1].startswith("  v2: ") and lines[k + 3].startswith("  v1: ")
        for rewards in (lines[k + 2], lines[k + 4]):
            assert re.match(
                r"^ +combined [+-]\d\.\d\d, question [01], the user answered: ", rewards
            )
    again = run_rapport("models", "compare", "v2", "v1", "--n", "2", timeout=300)
    assert again.stdout == result.stdout  # seeded: the same openers and replies
    served = run_rapport("models", "compare", "v2", "--n", "1", timeout=300)
    assert served.returncode == 0 and f"  {tiny_model_dir}: " in served.stdout  # vs the base
