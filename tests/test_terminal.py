"""`rapport chat` as a person uses it: a real process, typed lines, the logged rows."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import sys
import time

import pytest

from bot.config import Config, load_config
from bot.policy import Policy
from bot.session import Session
from bot.store import Store
from bot.terminal import Terminal
from rewards.score import score_store
from tests.conftest import run_rapport


def chat_process(tiny_model_dir, lines: list[str], *extra: str):
    return run_rapport(
        "--set",
        "generation.max_new_tokens=8",
        "chat",
        "--model",
        str(tiny_model_dir),
        "--seed",
        "0",
        "--user",
        "tester",
        *extra,
        input="".join(line + "\n" for line in lines),
    )


def test_piped_chat_transcript_and_logged_rows(tiny_model_dir, rapport_home):
    result = chat_process(
        tiny_model_dir,
        [
            "hello bot",
            "/up",
            "",
            "second message",
            "/down 2",
            "/new",
            "third",
            "/model",
            "/quit",
            "never sent",
        ],
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert len(out) == 9, out  # one line per input line (a blank one too), none after /quit
    # the tiny model never ends a reply itself: each was cut at max_new_tokens, and says so
    assert all(out[i].endswith(" […]") for i in (0, 3, 6)), out
    replies = [out[i].removesuffix(" […]") for i in (0, 3, 6)]
    assert all(r.strip() for r in replies)
    assert out[1] == "voted 👍 on the last reply"
    assert out[2] == ""
    assert out[4] == "voted 👎 on the reply 2 back"
    assert out[5] == "(new conversation)"
    assert out[7] == f"model: {tiny_model_dir}"
    assert out[8] == "bye"
    assert "Traceback" not in result.stderr

    with Store(rapport_home / "rapport.db") as store:
        conversations = [r["id"] for r in store.db["conversations"].rows]
        assert len(conversations) == 2  # split at /new
        ends = store.db.execute("SELECT end_reason FROM conversations ORDER BY id").fetchall()
        assert ends == [("new",), ("quit",)]  # so their last bot turns can be scored
        first = store.messages(conversations[0])
        second = store.messages(conversations[1])
        assert [(m.role, m.turn_index) for m in first] == [
            ("user", 0),
            ("bot", 1),
            ("user", 2),
            ("bot", 3),
        ]
        assert [m.text for m in first if m.role == "user"] == ["hello bot", "second message"]
        # logged as the model wrote it (no mark), flagged as cut
        assert [" ".join(m.text.split()) for m in first if m.role == "bot"] == replies[:2]
        assert all(m.generation["cut"] for m in first if m.role == "bot")
        assert [m.text for m in second] == ["third", second[1].text]
        user = first[0].user_id
        assert store.votes(first[1].id) == {user: -1}  # /up then /down 2: replaced
        assert store.votes(first[3].id) == {}
        assert store.counts()["votes"] == 1
        assert store.counts()["messages"] == 6


def test_piped_chat_reports_bad_commands_in_one_line_and_goes_on(tiny_model_dir, rapport_home):
    result = chat_process(tiny_model_dir, ["/up", "/frobnicate", "/up x", "//slash", "/forget"])
    out = result.stdout.splitlines()
    assert out[0] == "rapport: no reply to vote on yet"
    assert out[1].startswith("unknown command /frobnicate")
    assert out[2] == "/up takes a number of replies back, e.g. /up 2"
    assert out[3].strip()  # "//slash" was sent as "/slash" and answered
    assert out[4] == "forgotten: 2 messages, 0 votes"
    with Store(rapport_home / "rapport.db") as store:
        assert store.counts()["messages"] == 0


def test_a_model_that_fails_to_load_is_one_line(rapport_home, tmp_path):
    result = run_rapport("chat", "--model", str(tmp_path / "nope"), input="hi\n")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("rapport: error: no model folder")
    assert "Traceback" not in result.stderr


def test_a_model_crash_mid_chat_is_one_line_and_the_chat_goes_on(tiny_model_dir, store):
    config = Config()
    config.model.path = str(tiny_model_dir)
    config.generation.max_new_tokens = 6
    policy = Policy.load(config.model, config.generation, seed=0)
    real_stream = policy.stream

    def stream(turns, finish=None):
        if "boom" in turns[-1].text:
            raise RuntimeError("model exploded")
        return real_stream(turns, finish)

    policy.stream = stream
    session = Session(store, lambda: policy, platform="terminal", platform_user_id="t")
    out = io.StringIO()
    Terminal(
        session, out, interactive=False, read_line=scripted("boom please", "are you ok?")
    ).run()
    shown = out.getvalue().splitlines()
    assert shown[0].startswith("rapport: the model failed to reply (RuntimeError: model exploded)")
    assert shown[1].strip()
    texts = [m.text for m in store.messages(session.conversation_id)]
    assert texts[:2] == ["boom please", "are you ok?"] and len(texts) == 3


class PtyReader:
    """Everything a pty child printed so far; ``expect`` waits for text after the last match."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer, self.position = fd, b"", 0

    def expect(self, needle: str, timeout: float = 60) -> bytes:
        wanted = needle.encode()
        deadline = time.monotonic() + timeout
        while wanted not in self.buffer[self.position :]:
            if time.monotonic() > deadline:
                raise AssertionError(f"waited for {needle!r}, got {self.buffer[-500:]!r}")
            ready, _, _ = select.select([self.fd], [], [], 0.5)
            if ready:
                try:
                    self.buffer += os.read(self.fd, 4096)
                except OSError:
                    break
        end = self.buffer.index(wanted, self.position) + len(wanted)
        seen, self.position = self.buffer[self.position : end], end
        return seen


@pytest.mark.skipif(sys.platform != "linux", reason="pty test")
def test_interactive_ctrl_c_stops_a_reply_and_the_chat_goes_on(tiny_model_dir, rapport_home):
    pid, fd = pty.fork()
    if pid == 0:  # child: a real terminal session
        os.execvpe(
            sys.executable,
            [
                sys.executable,
                "-m",
                "bot.loop.cli",
                "--set",
                "generation.max_new_tokens=100000",
                "--set",
                "model.context_tokens=200000",
                "--set",  # streamed: with the safety filter a reply is shown only once checked
                "safety.enabled=false",
                "chat",
                "--model",
                str(tiny_model_dir),
                "--user",
                "tty",
                "--seed",  # seeded: the random tiny model's reply runs on (no early end)
                "7",
            ],
            {**os.environ, "TERM": "dumb"},
        )
    try:
        tty = PtyReader(fd)
        assert b"/up or /down" in tty.expect("you ›")
        os.write(fd, b"tell me a very long story\r")
        tty.expect("rapport ›")
        time.sleep(1.0)
        os.write(fd, b"\x03")  # Ctrl-C while the reply is being written
        tty.expect("[stopped]")
        tty.expect("you ›")
        os.write(fd, b"/quit\r")
        tty.expect("bye")
    finally:
        os.kill(pid, 9) if not os.waitpid(pid, os.WNOHANG)[0] else None
        os.waitpid(pid, 0)
    with Store(rapport_home / "rapport.db") as store:
        (conv,) = [r["id"] for r in store.db["conversations"].rows]
        rows = store.messages(conv)
        assert rows[0].text == "tell me a very long story"
        interrupted = [r for r in rows if r.role == "bot" and r.generation.get("interrupted")]
        assert len(interrupted) == 1 and interrupted[0] == rows[-1]  # the last, then /quit


def test_piped_retry_logs_both_replies_and_exports_the_pair(tiny_model_dir, rapport_home):
    """/retry with nothing to retry is one line; after a reply, it logs a second reply to
    the same user turn; /down before and /up after land on the old and the new reply;
    scoring gives the old one user_retry; the DPO export pairs (kept, replaced)."""
    result = chat_process(
        tiny_model_dir, ["/retry", "hello bot", "/down", "/retry", "/up", "/retry now", "/quit"]
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert len(out) == 7, out
    assert out[0] == "rapport: no reply to retry yet"
    assert out[2] == "voted 👎 on the last reply"
    assert out[4] == "voted 👍 on the last reply"
    assert out[5] == "/retry takes no arguments: it replaces the last reply"
    with Store(rapport_home / "rapport.db") as store:
        (conversation,) = [r["id"] for r in store.db["conversations"].rows]
        user, old, new = store.messages(conversation)
        assert (user.text, old.role, new.role) == ("hello bot", "bot", "bot")
        assert old.replaced_by == new.id and new.replaced_by is None
        assert [" ".join(m.text.split()) + " […]" for m in (old, new)] == [out[1], out[3]]
        assert store.votes(old.id) == {user.user_id: -1}
        assert store.votes(new.id) == {user.user_id: 1}
    assert old.text != new.text  # sampled anew (else the pair below would say nothing)

    with Store(rapport_home / "rapport.db") as store:
        score_store(store, load_config())  # as `rapport score` does (tests/test_scoring.py)
        assert store.rewards(old.id)["user_retry"] == 1.0
        assert store.rewards(new.id)["user_retry"] == 0.0
    pairs = rapport_home / "pairs.jsonl"
    result = run_rapport("export", str(pairs), "--format", "dpo", "--pairs-from", "retries")
    assert result.returncode == 0, result.stderr
    (row,) = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert row["prompt"][-1] == {"role": "user", "content": "hello bot"}
    assert row["chosen"] == [{"role": "assistant", "content": new.text}]
    assert row["rejected"] == [{"role": "assistant", "content": old.text}]


def test_piped_rate_validates_and_stores_one_rating_a_conversation(tiny_model_dir, rapport_home):
    how = "five whole numbers 1-5, for overall, fluency, diversity, relatedness, empathy"
    lines = ["/rate 4 5 3 4 4", "hi", "/rate 4 5 x 4 4", "/rate", "/rate 4 5 3 4 9"]
    lines += ["/rate 4 5 3 4 4", "/rate 5 5 5 5 5", "/quit"]
    result = chat_process(tiny_model_dir, lines)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    assert len(out) == 8, out
    assert out[0] == "rapport: no conversation to rate yet; chat first"
    assert out[2] == f"rapport: 'x' is not a rating: give {how} (e.g. 4 5 3 4 4)"
    assert out[3] == f"rapport: a rating is {how} (e.g. 4 5 3 4 4); got 0"
    assert out[4] == f"rapport: '9' is not a rating: give {how} (e.g. 4 5 3 4 4)"
    assert out[5] == "rated: overall 4, fluency 5, diversity 3, relatedness 4, empathy 4"
    assert out[6] == (
        "rated: overall 5, fluency 5, diversity 5, relatedness 5, empathy 5 "
        "(replaces your earlier rating)"
    )
    with Store(rapport_home / "rapport.db") as store:
        (conversation,) = [r["id"] for r in store.db["conversations"].rows]
        assert store.counts()["ratings"] == 1
        assert set(store.rating(conversation).values()) == {5}


def scripted(*lines: str):
    """A terminal's ``read_line`` that types ``lines``, then Ctrl-D."""
    typed = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(typed) + "\n"
        except StopIteration:
            raise EOFError from None

    return read_line
