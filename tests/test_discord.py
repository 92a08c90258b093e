"""The Discord frontend with spec'd fakes of discord.py classes; no network."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from bot.config import Config, DiscordConfig
from bot.discord_bot import make_client, read_token, split_message
from bot.policy import Settings
from bot.store import Store
from tests.conftest import run_rapport
from tests.discord_fakes import (
    fake_channel,
    fake_client_user,
    fake_interaction,
    fake_message,
    fake_reaction,
    fake_user,
)


class Replies(list):
    """A policy that answers with its texts in turn."""

    version = "scripted-v1"
    settings = Settings(temperature=0.7, top_p=0.9, max_new_tokens=10, repetition_penalty=1.1)

    def stream(self, turns, finish=None):
        yield self.pop(0)


class ScriptedPolicy:
    """A policy that answers with a fixed text (optionally slowly)."""

    version = "scripted-v1"
    settings = Settings(temperature=0.7, top_p=0.9, max_new_tokens=10, repetition_penalty=1.1)

    def __init__(self, text="Hello there! How are you?", delay=0.0, cut=False):
        self.text, self.delay, self.cut = text, delay, cut

    def stream(self, turns, finish=None):
        if self.delay:
            time.sleep(self.delay)
        yield self.text
        if finish is not None:
            finish["cut"] = self.cut  # as Policy.stream: the length limit ended the reply


def client_for(store, policy, **settings):
    config = DiscordConfig(**settings)
    client = make_client(store, lambda: policy, config)
    client._connection.user = fake_client_user()
    return client


def rows(store):
    return store.db.execute("SELECT role, text FROM messages ORDER BY id").fetchall()


@pytest.fixture
def store(rapport_home):
    with Store(rapport_home / "rapport.db") as s:
        yield s


def test_a_dm_gets_a_reply_with_vote_buttons_and_both_turns_are_logged(store):
    client = client_for(store, ScriptedPolicy())
    channel = fake_channel(dm=True)
    asyncio.run(client.on_message(fake_message("hi bot", fake_user(), channel)))
    assert [m.content for m in channel.sent] == ["Hello there! How are you?"]
    assert channel.typing_entered
    assert channel.sent[-1].reactions_added == ["👍", "👎", "🔁"]
    assert rows(store) == [("user", "hi bot"), ("bot", "Hello there! How are you?")]
    (platform,) = {r[0] for r in store.db.execute("SELECT platform FROM conversations")}
    assert platform == "discord"


def test_making_the_client_warns_nothing_about_voice(store, caplog):
    import discord

    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = True  # as on import
    with caplog.at_level(logging.WARNING):
        client_for(store, ScriptedPolicy())
    assert not [r for r in caplog.records if "voice" in r.getMessage()]


def test_a_reply_cut_at_the_length_limit_says_so_and_is_logged_as_written(store):
    client = client_for(store, ScriptedPolicy("I was going to say that the", cut=True))
    channel = fake_channel(dm=True)
    asyncio.run(client.on_message(fake_message("hi bot", fake_user(), channel)))
    assert [m.content for m in channel.sent] == ["I was going to say that the […]"]
    assert rows(store)[-1] == ("bot", "I was going to say that the")
    (generation,) = store.db.execute("SELECT generation FROM messages WHERE role = 'bot'")
    assert '"cut": true' in generation[0]


def test_mentions_in_allowed_channels_only(store):
    allowed, other = fake_channel(), fake_channel()
    client = client_for(store, ScriptedPolicy(), allowed_channels=str(allowed.id))
    user = fake_user()
    me = client.user
    asyncio.run(client.on_message(fake_message(f"<@{me.id}> hello", user, allowed, [me])))
    asyncio.run(client.on_message(fake_message(f"<@{me.id}> hello", user, other, [me])))
    asyncio.run(client.on_message(fake_message("no mention here", user, allowed)))
    assert len(allowed.sent) == 1 and other.sent == []
    assert rows(store)[0] == ("user", "hello")  # the mention itself is not logged


def test_messages_from_bots_are_ignored(store):
    client = client_for(store, ScriptedPolicy())
    channel = fake_channel(dm=True)
    asyncio.run(client.on_message(fake_message("beep", fake_user(bot=True), channel)))
    own = client.user
    asyncio.run(client.on_message(fake_message("my own words", own, channel)))
    assert channel.sent == [] and rows(store) == []


def test_a_5000_character_reply_arrives_as_3_messages_logged_as_one_turn(store):
    long_reply = ("This is a sentence of a long answer. " * 140)[:5000]
    client = client_for(store, ScriptedPolicy(long_reply))
    channel = fake_channel(dm=True)
    asyncio.run(client.on_message(fake_message("tell me everything", fake_user(), channel)))
    assert len(channel.sent) == 3
    assert all(len(m.content) <= 2000 for m in channel.sent)
    assert " ".join(m.content for m in channel.sent) == long_reply.strip()
    assert rows(store) == [("user", "tell me everything"), ("bot", long_reply.strip())]
    (bot_id,) = [r[0] for r in store.db.execute("SELECT id FROM messages WHERE role='bot'")]
    for part in channel.sent:  # a reaction on any part votes on the turn
        assert store.message_for_platform("discord", str(part.id)) == bot_id


def test_reactions_vote_and_withdraw_but_not_on_user_messages_or_by_the_bot(store):
    client = client_for(store, ScriptedPolicy())
    channel, user = fake_channel(dm=True), fake_user()
    said = fake_message("hi", user, channel)
    asyncio.run(client.on_message(said))
    reply = channel.sent[-1]
    (bot_id,) = [r[0] for r in store.db.execute("SELECT id FROM messages WHERE role='bot'")]
    pseudonym = store.ensure_user("discord", str(user.id))

    asyncio.run(client.on_raw_reaction_add(fake_reaction(reply.id, user.id, "👍")))
    assert store.votes(bot_id) == {pseudonym: 1}
    asyncio.run(client.on_raw_reaction_add(fake_reaction(reply.id, user.id, "👎")))
    assert store.votes(bot_id) == {pseudonym: -1}
    asyncio.run(client.on_raw_reaction_remove(fake_reaction(reply.id, user.id, "👍")))
    assert store.votes(bot_id) == {pseudonym: -1}  # not the current vote: kept
    asyncio.run(client.on_raw_reaction_remove(fake_reaction(reply.id, user.id, "👎")))
    assert store.votes(bot_id) == {}

    asyncio.run(client.on_raw_reaction_add(fake_reaction(reply.id, client.user.id, "👍")))
    asyncio.run(client.on_raw_reaction_add(fake_reaction(said.id, user.id, "👍")))
    asyncio.run(client.on_raw_reaction_add(fake_reaction(reply.id, user.id, "🎉")))
    assert store.counts()["votes"] == 0


def test_slash_forget_removes_the_users_rows_and_confirms(store):
    client = client_for(store, ScriptedPolicy())
    channel, alice, bob = fake_channel(), fake_user(), fake_user()
    me = client.user
    for user in (alice, bob):
        asyncio.run(client.on_message(fake_message(f"<@{me.id}> hi", user, channel, [me])))
    assert store.counts()["messages"] == 4
    interaction = fake_interaction(alice, channel)
    asyncio.run(client.commands_by_name["forget"].callback(interaction))
    interaction.response.defer.assert_awaited_once()
    assert "deleted 2 messages" in interaction.followup.send.await_args.args[0]
    assert store.counts()["messages"] == 2
    assert rows(store) == [("user", "hi"), ("bot", "Hello there! How are you?")]


def test_opted_out_users_get_replies_but_are_not_logged(store):
    client = client_for(store, ScriptedPolicy())
    channel, user = fake_channel(dm=True), fake_user()
    asyncio.run(client.commands_by_name["optout"].callback(fake_interaction(user, channel)))
    asyncio.run(client.on_message(fake_message("secret stuff", user, channel)))
    assert channel.sent[0].content == "Hello there! How are you?"
    assert "not saved" in channel.sent[-1].content  # told once
    assert channel.sent[0].reactions_added == []  # nothing to vote on
    assert store.counts()["messages"] == 0


def test_about_and_new_answer_ephemerally(store):
    client = client_for(store, ScriptedPolicy())
    channel, user = fake_channel(dm=True), fake_user()
    interaction = fake_interaction(user, channel)
    asyncio.run(client.commands_by_name["about"].callback(interaction))
    text = interaction.followup.send.await_args.args[0]
    assert "scripted-v1" in text and "/optout" in text
    assert interaction.followup.send.await_args.kwargs["ephemeral"] is True
    asyncio.run(client.on_message(fake_message("one", user, channel)))
    asyncio.run(client.commands_by_name["new"].callback(fake_interaction(user, channel)))
    asyncio.run(client.on_message(fake_message("two", user, channel)))
    assert store.counts()["conversations"] == 2


def test_the_event_loop_keeps_handling_events_while_a_reply_is_generated(store):
    slow = ScriptedPolicy(delay=1.0)
    client = client_for(store, slow)
    slow_channel = fake_channel(dm=True)
    finished = {}

    async def scenario():
        async def timed(name, coroutine):
            await coroutine
            finished[name] = time.monotonic()

        slow_task = asyncio.create_task(
            timed("slow", client.on_message(fake_message("slow one", fake_user(), slow_channel)))
        )
        await asyncio.sleep(0.2)  # the slow generation is running in its thread
        loop_started = time.monotonic()
        await timed("tick", asyncio.sleep(0.01))
        await slow_task
        return loop_started

    started = asyncio.run(scenario())
    assert finished["tick"] - started < 0.5  # the loop was free
    assert finished["tick"] < finished["slow"]


def test_a_failing_generation_answers_one_readable_line(store):
    class Broken(ScriptedPolicy):
        def stream(self, turns, finish=None):
            raise RuntimeError("model on fire")
            yield  # pragma: no cover

    client = client_for(store, Broken())
    channel = fake_channel(dm=True)
    asyncio.run(client.on_message(fake_message("hello?", fake_user(), channel)))
    (answer,) = [m.content for m in channel.sent]
    assert answer.startswith("Sorry, I couldn't answer that: the model failed to reply")
    assert "\n" not in answer
    assert rows(store) == [("user", "hello?")]


def test_rate_limit_is_polite(store):
    client = client_for(store, ScriptedPolicy(), rate_limit_per_minute=2)
    channel, user = fake_channel(dm=True), fake_user()
    for text in ("a", "b", "c"):
        asyncio.run(client.on_message(fake_message(text, user, channel)))
    assert channel.sent[-1].content.startswith("You're writing faster than I can think")
    assert store.counts()["messages"] == 4


def test_split_message_cuts_at_boundaries():
    first = "a" * 1500 + ".\n\n"
    parts = split_message(first + "b " * 600)
    assert parts[0] == "a" * 1500 + "." and all(len(p) <= 2000 for p in parts)
    assert [len(p) for p in split_message("x" * 4500)] == [2000, 2000, 500]  # no boundary
    assert split_message("short") == ["short"]


def test_token_comes_only_from_the_environment_or_a_file(tmp_path):
    with pytest.raises(Exception, match="no Discord token"):
        read_token(DiscordConfig(), environ={})
    token_file = tmp_path / "token"
    token_file.write_text("FILE.TOKEN\n")
    assert read_token(DiscordConfig(token_file=str(token_file)), environ={}) == "FILE.TOKEN"
    assert read_token(DiscordConfig(), environ={"DISCORD_TOKEN": "ENV.TOKEN"}) == "ENV.TOKEN"


def test_the_token_never_appears_in_logs_or_errors(tiny_model_dir, rapport_home):
    secret = "MTIzNDU2Nzg5.FAKE.very-secret-token-value"
    result = run_rapport(
        "discord", "--model", str(tiny_model_dir), env={"DISCORD_TOKEN": secret}, timeout=120
    )
    assert result.returncode == 1
    assert secret not in result.stdout and secret not in result.stderr
    assert "very-secret" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("rapport: error: ")
    assert "Traceback" not in result.stderr
    missing = run_rapport("discord", env={"DISCORD_TOKEN": ""})
    assert missing.stderr.strip() == (
        "rapport: error: no Discord token: set DISCORD_TOKEN or name a file in discord.token_file"
    )


def test_config_rejects_bad_channel_ids():
    from bot.errors import ConfigError

    config = Config()
    config.discord.allowed_channels = "123, general"
    with pytest.raises(ConfigError, match="channel ids"):
        config.validate()


def test_sharded_config_uses_the_auto_sharded_client(store):
    import discord

    sharded = make_client(store, lambda: ScriptedPolicy(), DiscordConfig(sharded=True))
    plain = make_client(store, lambda: ScriptedPolicy(), DiscordConfig())
    assert isinstance(sharded, discord.AutoShardedClient)
    assert not isinstance(plain, discord.AutoShardedClient)
    assert not plain.intents.message_content  # privileged intent only when configured
    with_content = make_client(
        store, lambda: ScriptedPolicy(), DiscordConfig(message_content_intent=True)
    )
    assert with_content.intents.message_content


def test_an_idle_conversation_ends_and_the_next_message_starts_a_new_one(store):
    client = client_for(store, ScriptedPolicy(), idle_minutes=1)
    channel, user = fake_channel(dm=True), fake_user()
    asyncio.run(client.on_message(fake_message("first", user, channel)))
    asyncio.run(client.on_message(fake_message("still here", user, channel)))
    assert store.counts()["conversations"] == 1
    (conversation,) = client.conversations.values()
    conversation.last_used -= 61  # a minute and a second of silence
    asyncio.run(client.on_message(fake_message("back again", user, channel)))
    assert store.counts()["conversations"] == 2
    ends = store.db.execute("SELECT end_reason FROM conversations ORDER BY id").fetchall()
    assert ends == [("idle",), (None,)]  # the first ended idle; the second is live


def test_a_retry_reaction_sends_a_new_reply_and_logs_both(store):
    """🔁 on the latest reply: a new reply in the channel, both logged, the old one marked
    replaced; 👎 on the old reply's message still lands on the old one; 🔁 on an older
    reply gets one line, and 🔁 from someone else is ignored."""
    client = client_for(store, Replies(["Stocks fell.", "Hiking, you?", "Nice!", "spare"]))
    channel, user, other = fake_channel(dm=True), fake_user(), fake_user()
    asyncio.run(client.on_message(fake_message("weekend plans?", user, channel)))
    old_message = channel.sent[-1]
    asyncio.run(
        client.on_raw_reaction_add(fake_reaction(old_message.id, other.id, "🔁", channel.id))
    )
    assert len(channel.sent) == 1  # not their conversation
    asyncio.run(
        client.on_raw_reaction_add(fake_reaction(old_message.id, user.id, "🔁", channel.id))
    )
    new_message = channel.sent[-1]
    assert new_message.content == "Hiking, you?"
    assert new_message.reactions_added == ["👍", "👎", "🔁"]
    old_id, new_id = (r[0] for r in store.db.execute("SELECT id FROM messages WHERE role='bot'"))
    assert store.message(old_id).replaced_by == new_id
    assert store.message_for_platform("discord", str(new_message.id)) == new_id

    pseudonym = store.ensure_user("discord", str(user.id))
    asyncio.run(
        client.on_raw_reaction_add(fake_reaction(old_message.id, user.id, "👎", channel.id))
    )
    asyncio.run(
        client.on_raw_reaction_add(fake_reaction(new_message.id, user.id, "👍", channel.id))
    )
    assert store.votes(old_id) == {pseudonym: -1} and store.votes(new_id) == {pseudonym: 1}

    asyncio.run(client.on_message(fake_message("you too", user, channel)))
    assert channel.sent[-1].content == "Nice!"
    asyncio.run(
        client.on_raw_reaction_add(fake_reaction(new_message.id, user.id, "🔁", channel.id))
    )
    assert channel.sent[-1].content == (
        "I can't retry that: only the latest reply of a conversation can be retried"
    )
    assert rows(store) == [
        ("user", "weekend plans?"),
        ("bot", "Stocks fell."),
        ("bot", "Hiking, you?"),
        ("user", "you too"),
        ("bot", "Nice!"),
    ]
    session = client.conversations[(channel.id, user.id)].session
    assert [t.text for t in session.history] == [
        "weekend plans?",
        "Hiking, you?",
        "you too",
        "Nice!",
    ]


def test_slash_rate_stores_one_rating_per_conversation_and_says_so(store):
    client = client_for(store, ScriptedPolicy())
    channel, user = fake_channel(dm=True), fake_user()
    rate = client.commands_by_name["rate"]
    assert [p.name for p in rate.parameters] == [
        "overall", "fluency", "diversity", "relatedness", "empathy"
    ]  # fmt: skip
    assert {(p.min_value, p.max_value) for p in rate.parameters} == {(1, 5)}  # Discord checks

    interaction = fake_interaction(user, channel)
    asyncio.run(rate.callback(interaction, 4, 5, 3, 4, 4))
    assert interaction.followup.send.await_args.args[0] == (
        "Not rated: no conversation to rate yet; chat first"
    )
    asyncio.run(client.on_message(fake_message("hi", user, channel)))
    for answers in ((4, 5, 3, 4, 4), (2, 3, 3, 3, 3)):
        interaction = fake_interaction(user, channel)
        asyncio.run(rate.callback(interaction, *answers))
        interaction.response.defer.assert_awaited_once()
        assert interaction.followup.send.await_args.kwargs["ephemeral"] is True
    assert interaction.followup.send.await_args.args[0] == (
        "Thanks for rating! (This replaces your earlier rating.)"
    )
    (conversation,) = [r["id"] for r in store.db["conversations"].rows]
    assert store.rating(conversation) == dict(
        overall=2, fluency=3, diversity=3, relatedness=3, empathy=3
    )


def test_forget_while_a_reply_is_written_waits_for_it_then_deletes_both(store):
    """Found by bench/soak.py: /forget mid-reply deleted the conversation under the reply,
    which then failed ("no conversation") and was never logged or sent as written."""
    client = client_for(store, ScriptedPolicy(delay=0.5))
    channel, user = fake_channel(dm=True), fake_user()
    interaction = fake_interaction(user, channel)

    async def scenario():
        replying = asyncio.create_task(client.on_message(fake_message("hi", user, channel)))
        await asyncio.sleep(0.2)  # the reply is being generated
        await client.commands_by_name["forget"].callback(interaction)
        await replying

    asyncio.run(scenario())
    assert [m.content for m in channel.sent] == ["Hello there! How are you?"]
    assert "deleted 2 messages" in interaction.followup.send.await_args.args[0]
    assert store.counts()["messages"] == 0 and store.counts()["platform_messages"] == 0


def test_a_quick_thumbs_up_then_off_leaves_no_vote(store, monkeypatch):
    """Found by bench/soak.py: the two events' threads could run in either order."""
    client = client_for(store, ScriptedPolicy())
    channel, user = fake_channel(dm=True), fake_user()
    asyncio.run(client.on_message(fake_message("hi", user, channel)))
    reply = channel.sent[-1]
    vote = store.vote

    def slow_vote(message_id, user_id, value):
        if value:
            time.sleep(0.3)  # the 👍 thread is slow to get to the database
        vote(message_id, user_id, value)

    monkeypatch.setattr(store, "vote", slow_vote)

    async def scenario():
        on = client.on_raw_reaction_add(fake_reaction(reply.id, user.id, "👍"))
        off = client.on_raw_reaction_remove(fake_reaction(reply.id, user.id, "👍"))
        await asyncio.gather(on, off)

    asyncio.run(scenario())
    assert store.counts()["votes"] == 0


def test_a_vote_on_a_reply_deleted_meanwhile_is_dropped_quietly(store, monkeypatch):
    client = client_for(store, ScriptedPolicy())
    user = fake_user()
    monkeypatch.setattr(store, "message_for_platform", lambda platform, pid: 10**6)
    asyncio.run(client.on_raw_reaction_add(fake_reaction(123, user.id, "👍")))
    assert store.counts()["votes"] == 0


def test_a_new_users_quick_messages_are_answered_and_logged_in_the_order_sent(store, monkeypatch):
    """Two messages a few milliseconds apart from someone new: the first one's session is
    made in a thread (slowly here), yet the second waits its turn (found by the soak)."""
    import bot.discord_bot as discord_bot
    from bot.session import Session

    made = []

    def slow_first_session(*args):
        made.append(args)
        if len(made) == 1:
            time.sleep(0.3)
        return Session(*args)

    monkeypatch.setattr(discord_bot, "Session", slow_first_session)
    client = client_for(store, Replies(["one back", "two back"]))
    channel, user = fake_channel(dm=True), fake_user()

    async def burst():
        first = asyncio.create_task(client.on_message(fake_message("one", user, channel)))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, client.on_message(fake_message("two", user, channel)))

    asyncio.run(burst())
    assert rows(store) == [
        ("user", "one"),
        ("bot", "one back"),
        ("user", "two"),
        ("bot", "two back"),
    ]
    assert len(made) == 1  # one session for the conversation


def test_replies_are_generated_one_at_a_time_by_default_in_the_order_asked(store):
    """Found by bench/soak.py: five reply threads at once held the GIL in turn and the
    event loop waited behind them (122 ms); on a CPU they only shared its cores."""
    running, most, order = [], [], []

    class Counting(ScriptedPolicy):
        def stream(self, turns, finish=None):
            running.append(turns[-1].text)
            most.append(len(running))
            time.sleep(0.05)
            order.append(running.pop())
            yield f"back to {turns[-1].text}"

    def burst(**settings):
        running.clear(), most.clear(), order.clear()
        client = client_for(store, Counting(), **settings)
        channels = [fake_channel(dm=True) for _ in range(4)]
        users = [fake_user() for _ in range(4)]

        async def go():
            tasks = []
            for i, (channel, user) in enumerate(zip(channels, users, strict=True)):
                tasks.append(
                    asyncio.create_task(client.on_message(fake_message(f"m{i}", user, channel)))
                )
                await asyncio.sleep(0.005)  # in this order
            await asyncio.gather(*tasks)

        asyncio.run(go())
        return [c.sent[-1].content for c in channels]

    assert burst() == [f"back to m{i}" for i in range(4)]
    assert max(most) == 1 and order == ["m0", "m1", "m2", "m3"]
    assert burst(replies_at_once=2) == [f"back to m{i}" for i in range(4)]
    assert max(most) == 2  # the setting is the bound, not a lock by another name


def test_replies_at_once_below_one_is_refused():
    with pytest.raises(Exception, match="discord.replies_at_once must be >= 1"):
        DiscordConfig(replies_at_once=0).validate()
