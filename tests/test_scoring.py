"""Import, incremental scoring, the combined reward and the report, on real data."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from itertools import islice

import pytest

from bot.config import Config
from bot.corpora import CHITCHAT_PLATFORM, chitchat_conversations, chitchat_path
from bot.store import Store
from bot.store_ratings import RATING_QUESTIONS
from rewards.combine import combine, fit_stats, z_score
from rewards.score import contexts_of, score_store
from rewards.suite import COMBINED, SCORER_VERSION, SIGNAL_NAMES
from tests.conftest import run_rapport


def test_constant_signals_do_not_divide_by_zero():
    stats = fit_stats({"flat": [3.0, 3.0, 3.0], "empty": []})
    assert stats == {"flat": (3.0, 0.0, 3), "empty": (0.0, 0.0, 0)}
    assert z_score(3.0, stats["flat"]) == 0.0
    assert combine({"flat": 3.0}, stats, {"flat": 5.0}) == 0.0


def test_combined_is_the_weighted_sum_of_z_scores():
    stats = fit_stats({"a": [1.0, 3.0], "b": [0.0, 10.0]})
    assert combine({"a": 3.0, "b": 0.0}, stats, {"a": 2.0, "b": 1.0}) == pytest.approx(1.0)
    assert combine({"a": 3.0, "b": 0.0}, stats, {"a": 2.0, "b": 0.0}) == pytest.approx(2.0)


def chat_log(store: Store, ended: bool = True) -> dict[str, int]:
    """A small labelled log: ids of the bot turns by what the user did next; the user
    then left (``ended``) or may still answer the last turn."""
    user = store.ensure_user("terminal", "ann")
    conv = store.start_conversation(user, "terminal")
    ids = {}
    store.add_message(conv, "user", "I just adopted a puppy!")
    ids["liked"] = store.add_message(conv, "bot", "Congrats! What breed is your dog?")
    store.add_message(conv, "user", "hahaha a corgi, I love him so much")
    ids["disliked"] = store.add_message(conv, "bot", "The stock market fell today.")
    store.add_message(conv, "user", "that is boring and weird, ugh")
    ids["last"] = store.add_message(conv, "bot", "Sorry! Corgis are lovely.")
    store.vote(ids["liked"], user, 1)
    store.vote(ids["disliked"], user, -1)
    if ended:
        store.end_conversation(conv, "quit")
    return ids


def test_contexts_link_each_bot_turn_to_the_user_turns_around_it(store):
    ids = chat_log(store)
    (conv,) = store.conversations_to_score(SCORER_VERSION)
    pairs = contexts_of(store.conversation_turns([conv])[conv])
    (liked, c1), (_, c2), (last, c3) = pairs
    assert liked["id"] == ids["liked"] and last["id"] == ids["last"]
    assert c1.prev_user == "I just adopted a puppy!"
    assert c1.next_user == "hahaha a corgi, I love him so much"
    assert c1.votes == (1,)
    assert c2.earlier_bot == ("Congrats! What breed is your dog?",)
    assert c3.next_user is None


def test_scoring_stores_every_signal_and_a_combined_reward_that_ranks_reactions(store):
    ids = chat_log(store)
    summary = score_store(store, Config())
    assert (summary.conversations, summary.bot_turns, summary.combined) == (1, 3, 3)
    liked, disliked = store.rewards(ids["liked"]), store.rewards(ids["disliked"])
    assert set(liked) == {*SIGNAL_NAMES, COMBINED}
    assert liked["user_laughter"] == 1.0 and disliked["user_laughter"] == 0.0
    assert liked["bot_question"] == 1.0 and liked["manual_vote"] == 1.0
    assert liked["combined"] > disliked["combined"]
    assert all(math.isfinite(v) for v in liked.values())
    versions = {r[0] for r in store.db.execute("SELECT DISTINCT scorer_version FROM rewards")}
    assert versions == {SCORER_VERSION}
    assert set(store.reward_stats()) == set(SIGNAL_NAMES)


def test_score_progress_counts_bot_turns_not_conversations(store):
    """A long conversation and a short one: the bar moves by bot turns (what takes the
    time) and ends at the total it announced."""
    chat_log(store)  # 3 bot turns
    user = store.ensure_user("terminal", "other")
    short = store.start_conversation(user, "terminal")
    store.add_message(short, "user", "hi")
    store.add_message(short, "bot", "hello")
    store.end_conversation(short, "quit")
    assert store.turns_to_score(SCORER_VERSION) == 4
    config = Config()
    config.scoring.batch_conversations = 1
    steps: list[int] = []
    summary = score_store(store, config, progress=steps.append)
    assert sorted(steps) == [1, 3] and summary.bot_turns == 4


def test_a_live_conversations_unanswered_turn_waits_for_the_reply_or_the_end(store):
    """The last bot turn of a live chat is not "the user left": it is not scored (no
    reply-dependent signal at its end value) until the user answers it (continued: 1) or
    the conversation ends (continued: 0), by /quit or after scoring.idle_minutes idle."""
    ids = chat_log(store, ended=False)
    config = Config()
    assert score_store(store, config).bot_turns == 2
    assert store.rewards(ids["last"]) == {}
    assert store.rewards(ids["liked"])["user_continued"] == 1.0
    conv = store.message(ids["last"]).conversation_id
    store.add_message(conv, "user", "lol yes they are 😂")
    score_store(store, config)
    assert store.rewards(ids["last"])["user_continued"] == 1.0
    assert store.rewards(ids["last"])["user_laughter"] == 1.0
    waiting = store.add_message(conv, "bot", "Do you walk him every day?")
    score_store(store, config)
    assert store.rewards(waiting) == {}  # still live: the user may answer
    config.scoring.idle_minutes = 1e-6  # a minute-long wait, shortened
    time.sleep(0.01)
    score_store(store, config)
    assert store.conversation_ended(conv)
    assert store.rewards(waiting)["user_continued"] == 0.0  # ended with it: the user left
    (reason,) = store.db.execute("SELECT end_reason FROM conversations").fetchone()
    assert reason == "idle"


def test_ctrl_c_says_what_was_saved_and_how_to_go_on(store, rapport_home, monkeypatch, capsys):
    """An interrupted `rapport score` ends with one line, not a bare ^C or a traceback."""
    import bot.loop.cli
    import rewards.score

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rewards.score, "score_store", interrupted)
    with pytest.raises(SystemExit) as exit:
        bot.loop.cli.main(["score"])
    assert exit.value.code == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "interrupted: every scored batch is saved; `rapport score` goes on from there"
    )
    assert "Traceback" not in err


def test_scoring_is_incremental_and_rescoring_follows_new_replies_and_votes(store):
    ids = chat_log(store)
    score_store(store, Config())
    assert score_store(store, Config()).bot_turns == 0  # nothing new
    user = store.message(ids["last"]).user_id
    conv = store.message(ids["last"]).conversation_id
    store.add_message(conv, "user", "lol yes they are 😂")  # a reply to the last bot turn
    assert store.rewards(ids["last"])["user_laughter"] == 0.0
    assert score_store(store, Config()).bot_turns == 1  # the turn it answers, no other
    assert store.rewards(ids["last"])["user_laughter"] == 1.0
    store.vote(ids["last"], user, 1)
    score_store(store, Config())
    assert store.rewards(ids["last"])["manual_vote"] == 1.0
    rows = store.db.execute("SELECT COUNT(*) FROM rewards").fetchone()[0]
    assert rows == 3 * (len(SIGNAL_NAMES) + 1)


def test_a_growing_conversation_rescores_only_the_turns_it_changes_and_ends_as_from_scratch(
    store,
):
    """A live chat scored after every event, as `rapport score` on a timer sees it:
    each exchange rescores the turn it answers (and the new one once answered), not
    the whole conversation; a retry, a vote, the end and a rating rescore the turns
    they touch. At the end every turn's values equal one scoring from scratch."""
    user = store.ensure_user("discord", "ann")
    conv = store.start_conversation(user, "discord")
    store.add_message(conv, "user", "hi there")
    bot = [store.add_message(conv, "bot", "Hello! How was your day?")]
    rescored = []
    for k in range(8):  # each user reply answers the last bot turn, then a new one waits
        store.add_message(conv, "user", ["great haha", "ugh, boring", "lol 😂"][k % 3])
        bot.append(store.add_message(conv, "bot", f"Tell me more about part {k}?"))
        announced = store.turns_to_score(SCORER_VERSION)  # the progress bar's total
        rescored.append(score_store(store, Config()).bot_turns)
        assert announced == rescored[-1]
    assert rescored == [1] * 8  # was the whole conversation: 1, 2, ..., 8
    retry = store.add_message(conv, "bot", "What made it great?", replaces=bot[-1])
    assert score_store(store, Config()).bot_turns == 1  # the replaced one: its retry answered
    store.vote(bot[3], user, 1)
    assert score_store(store, Config()).bot_turns == 1
    store.add_message(conv, "user", "the weather, haha")
    assert score_store(store, Config()).bot_turns == 1  # the kept reply, answered
    last = store.add_message(conv, "bot", "Sunny days are the best.")
    store.end_conversation(conv, "quit")
    assert score_store(store, Config()).bot_turns == 1  # the user left after it
    store.rate(conv, user, dict.fromkeys(RATING_QUESTIONS, 4))
    assert score_store(store, Config()).bot_turns == len(bot) + 2  # the rating: every turn
    assert store.rewards(last)["user_rating"] != 0.0

    def values() -> dict[int, dict[str, float]]:
        rows = store.db.execute("SELECT message_id, name, value FROM rewards").fetchall()
        out: dict[int, dict[str, float]] = {}
        for message_id, name, value in rows:
            out.setdefault(message_id, {})[name] = value
        return out

    incremental = values()
    assert set(incremental) == {*bot, retry, last}
    store.db.execute("DELETE FROM rewards")
    store.db.execute("DELETE FROM scoring")
    assert score_store(store, Config()).bot_turns == len(bot) + 2
    assert values() == incremental


def corpus_counts() -> tuple[int, int]:
    """The corpus's own counts, read straight from its file."""
    data = json.loads(chitchat_path().read_text())
    conversations = messages = 0
    for conversation in data.values():
        turns = [m for m in conversation["messages"] if m and any(u["text"].strip() for u in m)]
        conversations += bool(turns)
        messages += len(turns)
    return conversations, messages


def test_chitchat_import_matches_the_corpus_and_reimport_adds_nothing(rapport_home):
    result = run_rapport("import", "chitchat", timeout=300)
    assert result.returncode == 0, result.stderr
    conversations, messages = corpus_counts()
    assert conversations == 7168
    with Store(rapport_home / "rapport.db") as store:
        counts = store.counts()
        assert (counts["conversations"], counts["messages"]) == (conversations, messages)
        authors = {r[0] for r in store.db.execute("SELECT DISTINCT author FROM messages")}
        assert authors == {"person"}  # human-written on both sides
    again = run_rapport("import", "chitchat", timeout=300)
    assert "imported 0 conversations (7,168 already there)" in again.stdout
    with Store(rapport_home / "rapport.db") as store:
        assert store.counts()["messages"] == messages


def test_jsonl_import_reports_bad_lines_by_number_and_keeps_the_good(rapport_home, tmp_path):
    good = {"id": "c1", "turns": [{"role": "user", "text": "hi"}, {"role": "bot", "text": "yo"}]}
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"turns": []}),
        json.dumps({"turns": [{"role": "robot", "text": "x"}]}),
        "",
        json.dumps({"turns": [{"role": "user", "text": "   "}]}),
        json.dumps(
            {
                "turns": [
                    {"role": "user", "text": "hola 😂"},
                    {"role": "bot", "text": "¡hola!", "author": "model"},
                ]
            }
        ),
    ]
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe binary\n")
    result = run_rapport("import", "jsonl", str(path))
    assert result.returncode == 0, result.stderr
    assert "imported 2 conversations; 5 bad lines skipped" in result.stdout
    # the bar counts the file's 7 non-blank lines, good and bad, and ends at 100%
    assert "importing jsonl: 0/7" in result.stderr
    assert "importing jsonl: 7/7 (100%)" in result.stderr
    for number, reason in [
        (2, "not JSON"),
        (3, "non-empty list"),
        (4, "role must be"),
        (6, "empty"),
        (8, "not UTF-8"),
    ]:
        assert f"corpus.jsonl:{number}: skipped:" in result.stderr and reason in result.stderr
    assert "Traceback" not in result.stderr
    again = run_rapport("import", "jsonl", str(path))
    assert "imported 0 conversations" in again.stdout
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({**good, "id": "c2"}) + "\n{not json\n")
    other = {"RAPPORT_HOME": str(tmp_path / "other")}
    assert (
        "imported 1 conversation; 1 bad line skipped"
        in run_rapport("import", "jsonl", str(one), env=other).stdout
    )  # not "1 conversations"
    with Store(rapport_home / "rapport.db") as store:
        rows = store.db.execute("SELECT role, author, text FROM messages ORDER BY id").fetchall()
        assert rows == [
            ("user", "person", "hi"),
            ("bot", "person", "yo"),
            ("user", "person", "hola 😂"),
            ("bot", "model", "¡hola!"),
        ]


def test_score_killed_midway_then_rerun_scores_each_turn_exactly_once(rapport_home):
    db = rapport_home / "rapport.db"
    with Store(db) as store:
        store.import_conversations(CHITCHAT_PLATFORM, list(islice(chitchat_conversations(), 60)))
        bot_turns = store.db.execute("SELECT COUNT(*) FROM messages WHERE role='bot'").fetchone()[0]
    env = {**os.environ, "RAPPORT_SCORING_BATCH_CONVERSATIONS": "5"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "bot.loop.cli", "score"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    with Store(db) as store:
        while store.counts()["scoring"] == 0:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with Store(db) as store:
        done = store.counts()["scoring"]
    assert 0 < done < bot_turns

    result = run_rapport("score", env={"RAPPORT_SCORING_BATCH_CONVERSATIONS": "5"})
    assert result.returncode == 0, result.stderr
    assert f"scored {bot_turns - done:,} bot turns" in result.stdout
    with Store(db) as store:
        assert store.counts()["scoring"] == bot_turns
        per_turn = store.db.execute(
            "SELECT COUNT(*), MIN(n), MAX(n) FROM (SELECT message_id, COUNT(*) AS n "
            "FROM rewards GROUP BY message_id)"
        ).fetchone()
        assert per_turn == (bot_turns, len(SIGNAL_NAMES) + 1, len(SIGNAL_NAMES) + 1)


def test_report_writes_valid_pngs_and_an_html_page_that_shows_them(rapport_home, tmp_path):
    with Store(rapport_home / "rapport.db") as store:
        chats = [chat_log(store) for _ in range(3)]
        user = store.ensure_user("terminal", "ann")
        for ids, answers in zip(chats, ((4, 5, 3, 4, 4), (2, 4, 2, 3, 5)), strict=False):
            store.rate(store.message(ids["last"]).conversation_id, user, dict(zip(
                ("overall", "fluency", "diversity", "relatedness", "empathy"), answers,
                strict=True,
            )))  # fmt: skip
        score_store(store, Config())
    out = tmp_path / "report"
    result = run_rapport("report", "rewards", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "ratings: 2 rated conversations; mean answers: overall 3.00, fluency 4.50, "
        "diversity 2.50, relatedness 3.50, empathy 4.50"
    )
    page = (out / "index.html").read_text()
    assert "<td>fluency</td><td>4.50</td>" in page
    for png in ("distributions.png", "correlations.png", "vote_agreement.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f'src="{png}"' in page
    assert "Congrats! What breed is your dog?" in page  # examples are shown, escaped
    assert "<script" not in page


def test_report_without_scores_is_one_line(rapport_home, tmp_path):
    result = run_rapport("report", "rewards", "--out", str(tmp_path / "r"))
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == "rapport: error: no scored bot turns yet: run `rapport score` first"
    )


def test_a_retried_reply_gets_user_retry_and_leaves_the_path(store):
    """A retry in a live chat: the replaced reply is scored at once (the retry was the
    user's answer: user_retry 1, no reply), the kept one answers the same user turn and
    is followed by the user's reply; neither sees the replaced one as an earlier turn."""
    user = store.ensure_user("terminal", "ann")
    conv = store.start_conversation(user, "terminal")
    store.add_message(conv, "user", "any plans for the weekend?")
    replaced = store.add_message(conv, "bot", "The stock market fell today.")
    store.vote(replaced, user, -1)
    kept = store.add_message(conv, "bot", "Hiking, I hope! You?", replaces=replaced)
    store.add_message(conv, "user", "haha same, hiking")
    last = store.add_message(conv, "bot", "Where do you hike?")
    pairs = {t["id"]: c for t, c in contexts_of(store.conversation_turns([conv])[conv])}
    assert set(pairs) == {replaced, kept}  # the last turn waits for the user's answer
    assert pairs[replaced].replaced and pairs[replaced].next_user is None
    assert pairs[replaced].prev_user == "any plans for the weekend?"
    assert pairs[kept].prev_user == "any plans for the weekend?"
    assert pairs[kept].next_user == "haha same, hiking" and pairs[kept].earlier_bot == ()

    score_store(store, Config())
    assert store.rewards(replaced)["user_retry"] == 1.0
    assert store.rewards(replaced)["manual_vote"] == -1.0  # its vote stayed on it
    assert store.rewards(kept)["user_retry"] == 0.0
    assert store.rewards(replaced)["combined"] < store.rewards(kept)["combined"]
    store.end_conversation(conv, "quit")
    score_store(store, Config())
    assert store.rewards(last)["user_retry"] == 0.0
    turns = store.training_conversations()[0]["turns"]
    assert [(t["id"], t["replaced_by"]) for t in turns if t["role"] == "bot"] == [
        (replaced, kept),
        (kept, None),
        (last, None),
    ]


def test_only_the_latest_reply_can_be_replaced(store):
    from bot.errors import InvalidInput

    user = store.ensure_user("terminal", "ann")
    conv = store.start_conversation(user, "terminal")
    store.add_message(conv, "user", "hi")
    old = store.add_message(conv, "bot", "hello")
    store.add_message(conv, "user", "how are you?")
    with pytest.raises(InvalidInput, match="only the latest reply"):
        store.add_message(conv, "bot", "fine", replaces=old)
    assert store.counts()["messages"] == 3


def test_a_rating_scores_the_conversations_last_bot_turn_once_it_arrives(store):
    """user_rating: (mean answer − 3) / 2 on the last bot turn of the path (not on a
    retried reply after it, not on earlier turns); a rating after scoring rescores."""
    ids = chat_log(store)
    conv = store.message(ids["last"]).conversation_id
    user = store.ensure_user("terminal", "ann")
    score_store(store, Config())
    assert store.rewards(ids["last"])["user_rating"] == 0.0  # not rated yet
    answers = dict(
        zip(
            ("overall", "fluency", "diversity", "relatedness", "empathy"),
            (5, 5, 4, 5, 4),
            strict=True,
        )
    )
    store.rate(conv, user, answers)
    assert store.conversations_to_score(SCORER_VERSION) == [conv]
    score_store(store, Config())
    assert store.rewards(ids["last"])["user_rating"] == pytest.approx(0.8)
    assert store.rewards(ids["liked"])["user_rating"] == 0.0
    assert store.rewards(ids["disliked"])["user_rating"] == 0.0


def test_reply_latency_is_read_from_live_chats_only(store):
    """user_reply_latency: ln(1 + seconds) from the bot turn to the user's reply in a
    chat; an imported log's timestamps are not answer times, so it scores 0 there."""
    from bot.store_data import Imported

    ids = chat_log(store)
    times = {  # the bot turns at 12:00:00, the user's replies 9 and 99 seconds later
        ids["liked"]: "2026-01-01T12:00:00.000000+00:00",
        ids["liked"] + 1: "2026-01-01T12:00:09.000000+00:00",
        ids["disliked"]: "2026-01-01T12:01:00.000000+00:00",
        ids["disliked"] + 1: "2026-01-01T12:02:39.000000+00:00",
    }
    for message_id, created in times.items():
        store.db.execute("UPDATE messages SET created = ? WHERE id = ?", [created, message_id])
    store.import_conversations(
        "chitchat",
        [
            Imported(
                "c1",
                "bob",
                (("user", "person", "hi"), ("bot", "person", "yo"), ("user", "person", "ok")),
            )
        ],
    )
    score_store(store, Config())
    assert store.rewards(ids["liked"])["user_reply_latency"] == pytest.approx(math.log(10))
    assert store.rewards(ids["disliked"])["user_reply_latency"] == pytest.approx(math.log(100))
    assert store.rewards(ids["last"])["user_reply_latency"] == 0.0  # never answered
    (imported,) = [r[0] for r in store.db.execute("SELECT id FROM messages WHERE text = 'yo'")]
    assert store.rewards(imported)["user_reply_latency"] == 0.0


def test_each_signal_is_correlated_with_the_end_of_chat_rating_of_its_conversation(store):
    """The report's 'r with ratings': over the bot turns of rated conversations only
    (a retried reply and an unrated conversation left out)."""
    import numpy as np

    from bot.store_ratings import RATING_QUESTIONS
    from rewards.report import rating_agreement

    user = store.ensure_user("terminal", "ann")
    ids, ratings = [], []
    for answer in (1, 3, 5, None):
        conversation = store.start_conversation(user, "terminal")
        for k in range(2):
            store.add_message(conversation, "user", f"hi {k}")
            ids.append(store.add_message(conversation, "bot", f"hello {k}"))
            ratings.append(answer or 0)
        if answer is not None:
            store.rate(conversation, user, dict.fromkeys(RATING_QUESTIONS, answer))
        if answer == 5:  # a retry: the replaced reply leaves, the new one counts
            ids.append(store.add_message(conversation, "bot", "again", replaces=ids[-1]))
            ratings.append(5)
    turns = store.rated_turns()
    assert ids[5] not in turns and turns[ids[6]] == 5.0
    assert sorted(turns.values()) == [1.0, 1.0, 3.0, 3.0, 5.0, 5.0]
    columns = {
        "follows": np.array(ratings, dtype=float) + np.arange(len(ids)) * 1e-3,
        "against": -np.array(ratings, dtype=float),
        "constant": np.ones(len(ids)),
    }
    r = rating_agreement(store, ids, columns)
    assert r["follows"] == pytest.approx(1.0, abs=1e-3)
    assert r["against"] == pytest.approx(-1.0)
    assert math.isnan(r["constant"])
