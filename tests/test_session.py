"""The dialog engine: what gets logged, when, and what the user is told."""

from __future__ import annotations

import pytest

from bot.config import Config
from bot.errors import InvalidInput, NotFound
from bot.policy import GenerationError, Policy, Settings
from bot.session import OPTED_OUT_NOTICE, Session, parse_rating


@pytest.fixture(scope="module")
def policy(tiny_model_dir) -> Policy:
    config = Config()
    config.model.path = str(tiny_model_dir)
    config.model.context_tokens = 256
    config.generation.max_new_tokens = 8
    return Policy.load(config.model, config.generation, seed=0)


@pytest.fixture
def session(store, policy) -> Session:
    return Session(store, lambda: policy, platform="terminal", platform_user_id="ann")


def test_both_turns_are_logged_with_the_model_version_and_settings(session, store, policy):
    streamed = []
    reply = session.respond("hello there", on_text=streamed.append)
    rows = store.messages(session.conversation_id)
    assert [(m.role, m.text) for m in rows] == [("user", "hello there"), ("bot", reply.text)]
    assert reply.text and reply.message_id == rows[1].id
    assert "".join(streamed).strip() == reply.text
    assert rows[1].model_version == policy.version
    # the untrained tiny model never picks an end of turn: the length limit cut the reply
    assert rows[1].generation == policy.settings.as_dict() | {"cut": True}
    assert store.conversation(session.conversation_id)["model_version"] == policy.version


def test_the_user_turn_is_committed_before_generation_starts(session, store, policy):
    seen_during_generation = []

    class Watching:
        version, settings = policy.version, policy.settings

        def stream(self, turns, finish=None):
            seen_during_generation.extend(m.text for m in store.messages(session.conversation_id))
            yield "ok"

    session.policy_source = lambda: Watching()
    session.respond("remember this")
    assert seen_during_generation == ["remember this"]


def test_a_crash_in_the_model_keeps_the_user_turn_and_the_chat_goes_on(session, store, policy):
    class Broken:
        version, settings = policy.version, policy.settings

        def stream(self, turns, finish=None):
            yield "half a"
            raise RuntimeError("CUDA out of memory")

    session.policy_source = lambda: Broken()
    with pytest.raises(GenerationError) as e:
        session.respond("are you there?")
    message = str(e.value)
    assert "\n" not in message and "RuntimeError: CUDA out of memory" in message
    assert "your message was saved" in message
    assert [m.text for m in store.messages(session.conversation_id)] == ["are you there?"]
    session.policy_source = lambda: policy
    reply = session.respond("hello again")
    texts = [m.text for m in store.messages(session.conversation_id)]
    assert texts == ["are you there?", "hello again", reply.text]


def test_ctrl_c_while_generating_keeps_what_was_shown_marked_interrupted(session, store, policy):
    class Interrupted:
        version, settings = policy.version, policy.settings

        def stream(self, turns, finish=None):
            yield "I was saying"
            raise KeyboardInterrupt

    session.policy_source = lambda: Interrupted()
    with pytest.raises(KeyboardInterrupt):
        session.respond("tell me a story")
    bot = store.messages(session.conversation_id)[-1]
    assert (bot.role, bot.text, bot.generation["interrupted"]) == ("bot", "I was saying", True)


def test_long_input_is_logged_whole_and_the_model_sees_it_truncated(session, store, policy):
    text = "START " + "x" * 100_000 + " END"
    seen = []
    real = policy.prompt_ids

    class Recording:
        version, settings = policy.version, policy.settings

        def stream(self, turns, finish=None):
            seen.append(real(turns))
            yield "wow"

    session.policy_source = lambda: Recording()
    session.respond(text)
    assert store.messages(session.conversation_id)[0].text == text
    assert len(seen[0]) <= policy.context_tokens


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_input_is_refused_without_a_log_row(session, store, text):
    with pytest.raises(InvalidInput):
        session.respond(text)
    assert store.counts()["messages"] == 0


@pytest.mark.parametrize("text", ["😂😂😂", "¿Qué tal estás?", "你好，你喜欢什么？"])
def test_emoji_only_and_non_english_get_a_reply(session, store, text):
    reply = session.respond(text)
    assert reply.text
    assert [m.text for m in store.messages(session.conversation_id)] == [text, reply.text]


def test_votes_count_back_from_the_last_reply(session, store):
    first = session.respond("one").message_id
    second = session.respond("two").message_id
    assert session.vote(1) == second
    assert session.vote(-1, back=2) == first
    assert store.votes(first) == {session.user_id: -1}
    assert store.votes(second) == {session.user_id: 1}
    with pytest.raises(NotFound, match="only 2 replies"):
        session.vote(1, back=3)


def test_new_conversation_splits_the_log(session, store):
    session.respond("first chat")
    first = session.conversation_id
    session.new_conversation()
    with pytest.raises(NotFound, match="no reply to vote on yet"):
        session.vote(1)
    session.respond("second chat")
    assert session.conversation_id != first
    assert store.messages(session.conversation_id)[0].text == "second chat"
    assert store.conversation_ended(first) and not store.conversation_ended(
        session.conversation_id
    )  # the first ended at /new; the second is live


def test_a_conversation_ended_while_idle_goes_on_as_a_new_one(session, store):
    """`rapport score` ends a chat idle for scoring.idle_minutes; the user's next message
    starts a new logged conversation instead of adding to the ended one."""
    session.respond("before the break")
    first = session.conversation_id
    store.end_conversation(first, "idle")
    session.respond("after the break")
    assert session.conversation_id != first
    assert [m.text for m in store.messages(first) if m.role == "user"] == ["before the break"]
    assert store.messages(session.conversation_id)[0].text == "after the break"


def test_opted_out_users_get_replies_but_nothing_is_logged(session, store):
    session.respond("logged")
    session.set_opt_out(True)
    reply = session.respond("not logged")
    assert reply.text and reply.message_id is None
    assert session.notice == OPTED_OUT_NOTICE
    assert "/optin allows it again" in session.notice  # the command both platforms have
    session.respond("still not logged")
    assert session.notice is None  # told once per conversation
    assert store.counts()["messages"] == 2
    with pytest.raises(InvalidInput, match="opted out"):
        session.vote(1)
    session.set_opt_out(False)
    session.respond("logged again")
    assert store.counts()["messages"] == 4


def test_forget_me_deletes_this_user_only(session, store, policy):
    other = Session(store, lambda: policy, platform="terminal", platform_user_id="bob")
    other.respond("bob here")
    session.respond("ann here")
    session.vote(1)
    deleted = session.forget_me()
    assert deleted["messages"] == 2 and deleted["votes"] == 1
    assert store.counts()["messages"] == 2
    session.respond("fresh start")  # the session goes on, as a new user row
    assert store.counts()["messages"] == 4


def test_a_reply_the_model_ended_is_not_marked_cut(session, store, policy):
    class Ends:
        version, settings = policy.version, policy.settings

        def stream(self, turns, finish=None):
            yield "done."
            finish["cut"] = False

    session.policy_source = lambda: Ends()
    session.respond("hi")
    bot = store.messages(session.conversation_id)[-1]
    assert bot.text == "done." and bot.generation == policy.settings.as_dict()


class Scripted:
    """A policy that answers with the next of its texts, and remembers what it saw."""

    settings = Settings(temperature=0.7, top_p=0.9, max_new_tokens=8, repetition_penalty=1.1)
    version = "scripted"

    def __init__(self, *texts: str):
        self.texts, self.seen = list(texts), []

    def stream(self, turns, finish=None):
        self.seen.append([(t.role, t.text) for t in turns])
        yield self.texts.pop(0)


def test_retry_logs_both_replies_and_the_model_sees_only_the_kept_one(store):
    policy = Scripted("Boring answer.", "Better answer!", "Glad you liked it.")
    session = Session(store, lambda: policy, platform="terminal", platform_user_id="ann")
    first = session.respond("tell me a joke")
    session.vote(-1)  # a vote before the retry stays on the reply it was cast on
    second = session.retry()
    assert second.text == "Better answer!" and second.message_id != first.message_id
    session.vote(1)  # after the retry, "the last reply" is the new one
    session.respond("haha")
    assert policy.seen[1] == [("user", "tell me a joke")]  # asked again, old reply gone
    assert policy.seen[2] == [
        ("user", "tell me a joke"),
        ("bot", "Better answer!"),
        ("user", "haha"),
    ]
    rows = store.messages(session.conversation_id)
    assert [(m.role, m.text, m.replaced_by) for m in rows] == [
        ("user", "tell me a joke", None),
        ("bot", "Boring answer.", second.message_id),
        ("bot", "Better answer!", None),
        ("user", "haha", None),
        ("bot", "Glad you liked it.", None),
    ]
    assert store.votes(first.message_id) == {session.user_id: -1}
    assert store.votes(second.message_id) == {session.user_id: 1}
    assert session.vote(1, back=2) == second.message_id  # counted along the kept replies


def test_retry_with_no_reply_yet_is_one_line_and_stores_nothing(session, store):
    with pytest.raises(NotFound, match="^no reply to retry yet$"):
        session.retry()
    assert store.counts()["messages"] == 0


def test_retry_of_a_reply_that_is_not_the_latest_is_refused(store):
    policy = Scripted("one", "two", "three")
    session = Session(store, lambda: policy, "discord", "ann")
    old = session.respond("hi").message_id
    session.respond("and?")
    with pytest.raises(InvalidInput, match="only the latest reply"):
        session.retry(message_id=old)
    assert store.counts()["messages"] == 4
    assert all(m.replaced_by is None for m in store.messages(session.conversation_id))


def test_a_failed_retry_keeps_the_old_reply(session, store, policy):
    kept = session.respond("hello")

    class Broken:
        version, settings = policy.version, policy.settings

        def stream(self, turns, finish=None):
            raise RuntimeError("out of memory")
            yield

    session.policy_source = lambda: Broken()
    with pytest.raises(GenerationError, match="the last reply stays, try again"):
        session.retry()
    session.policy_source = lambda: policy
    assert [m.replaced_by for m in store.messages(session.conversation_id)] == [None, None]
    again = session.retry()  # the old reply is still the one to retry
    assert store.message(kept.message_id).replaced_by == again.message_id


def test_retry_when_opted_out_replies_and_logs_nothing(session, store):
    session.set_opt_out(True)
    session.respond("secret")
    reply = session.retry()
    assert reply.text and reply.message_id is None
    assert store.counts()["messages"] == 0
    assert [t.role for t in session.history] == ["user", "bot"]


@pytest.mark.parametrize(
    "typed, message",
    [
        (["4", "5", "3", "4", "6"], "'6' is not a rating"),
        (["4", "5", "3", "4", "0"], "'0' is not a rating"),
        (["4", "five", "3", "4", "4"], "'five' is not a rating"),
        (["4", "4.5", "3", "4", "4"], "'4.5' is not a rating"),
        (["4", "", "3", "4", "4"], "'nothing' is not a rating"),
        ([], "a rating is five whole numbers 1-5, .* got 0"),
        (["4", "5"], "got 2"),
    ],
)
def test_a_rating_that_is_not_five_answers_1_to_5_is_one_line_and_not_stored(
    session, store, typed, message
):
    session.respond("hi")
    with pytest.raises(InvalidInput, match=message) as e:
        session.rate(parse_rating(typed))
    assert "\n" not in str(e.value)
    assert store.counts()["ratings"] == 0


def test_one_rating_a_conversation_the_second_replaces_the_first(session, store):
    with pytest.raises(NotFound, match="no conversation to rate yet"):
        session.rate(parse_rating("4 4 4 4 4".split()))
    session.respond("hi")
    assert session.rate(parse_rating("4 5 3 4 4".split())) is False
    assert session.rate(parse_rating("2 2 2 2 1".split())) is True
    first = session.conversation_id
    assert store.rating(first) == dict(overall=2, fluency=2, diversity=2, relatedness=2, empathy=1)
    session.new_conversation()  # /rate right after /new rates the chat that ended
    session.rate(parse_rating("5 5 5 5 5".split()))
    assert store.rating(first)["overall"] == 5 and store.counts()["ratings"] == 1
    session.respond("a new chat")
    session.rate(parse_rating("3 3 3 3 3".split()))
    assert store.rating(session.conversation_id)["overall"] == 3
    assert store.counts()["ratings"] == 2
    assert session.forget_me()["ratings"] == 2
