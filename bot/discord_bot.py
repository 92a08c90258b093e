"""``rapport discord``: the bot on Discord, a thin layer over :mod:`bot.session`.

Design
------
- Events become session calls and back; everything that is not about Discord lives in
  the session. Generation and database work run in ``asyncio.to_thread``: the event
  loop keeps handling other events (and Discord's heartbeat) while a reply is written.
- Where it answers: DMs always; in server channels when mentioned or replied to, in the
  allowed channels (all when the allow-list is empty). That works without the privileged
  message-content intent (Discord sends the content of DMs and mentions); with the
  intent configured it is requested. Messages from bots, itself included, are ignored.
- One session per (channel, user), ended after ``idle_minutes`` without a message. A
  per-session lock keeps one user's messages in order. At most ``replies_at_once``
  replies are generated at a time (default 1); the rest wait, typing, in arrival order:
  on a CPU, parallel generations only share the cores and, each holding the GIL in
  turn for its per-token Python, kept the event loop waiting (found by bench/soak.py).
- A reply longer than Discord's 2,000 characters is split at paragraph, line, sentence
  or word boundaries and sent as several messages, logged as one bot turn; every part is
  linked to that turn in the store, so a reaction on any part is a vote. 👍, 👎 and 🔁
  are added to the last part. Reactions are read from the raw events, so messages that
  are no longer cached count too; removing a reaction withdraws that vote; the bot's own
  reactions, reactions on users' messages and other emoji are not votes. Votes are
  written one at a time, in the order the events came.
- 🔁 on the latest reply of one's own live conversation is a retry
  (:meth:`bot.session.Session.retry`): the new reply is sent to the channel, both are
  logged, and a vote on the old one's messages still lands on the old one. 🔁 on an
  older reply gets one line saying only the latest can be retried; 🔁 from someone with
  no conversation here (another user's reply, or one from before a restart) is ignored.
- Slash commands /new, /forget, /optout, /optin, /about and /rate (1-5 on five
  questions, checked by Discord itself) answer ephemerally; those that touch the
  database defer first, so Discord's 3-second limit is never hit. Those that change the
  conversation take its lock, as a message does: /forget waits for the reply being
  written to that user, then deletes it with the rest (found by ``bench/soak.py``).
- The token comes from DISCORD_TOKEN or the configured file only, and is never printed
  or logged; a missing or rejected token is one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import discord
from discord import app_commands

from bot.config import DiscordConfig
from bot.errors import NotFound, RapportError
from bot.safety import SafetyFilter
from bot.session import RATING_PROMPTS, Reply, Session
from bot.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")

PLATFORM = "discord"
LIMIT = 2000
VOTES = {"👍": 1, "👎": -1}
RETRY = "🔁"
RatingAnswer = app_commands.Range[int, 1, 5]  # Discord refuses anything else
ABOUT = (
    "I'm rapport, a chat bot that learns what people enjoy from how they react. "
    "I log our messages, your 👍/👎/🔁 reactions and which model version answered, under a "
    "pseudonym (a keyed hash of your Discord id), to retrain myself offline. "
    "/optout stops the logging, /forget deletes everything of yours. Model: {version}."
)


class TokenError(RapportError):
    """No Discord token, or Discord rejected it (the token itself is never shown)."""


def split_message(text: str, limit: int = LIMIT) -> list[str]:
    """Parts of at most ``limit`` characters, cut at the last paragraph, line, sentence
    or word boundary before the limit (hard cut only inside a boundless run).

    >>> [len(p) for p in split_message("word " * 1000)]
    [1999, 1999, 999]
    """
    parts = []
    text = text.strip()
    while len(text) > limit:
        window = text[: limit + 1]
        for boundary in ("\n\n", "\n", ". ", "! ", "? ", " "):
            cut = window.rfind(boundary, 0, limit)
            if cut > limit // 2:  # never leave a tiny first part
                cut += len(boundary.rstrip(" ")) if boundary.strip() else 0
                break
        else:
            cut = limit
        parts.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        parts.append(text)
    return parts


class RateLimiter:
    """At most ``per_minute`` messages per user in any 60 seconds."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.times: dict[int, deque[float]] = {}

    def allow(self, user_id: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        recent = self.times.setdefault(user_id, deque())
        while recent and now - recent[0] > 60:
            recent.popleft()
        if len(recent) >= self.per_minute:
            return False
        recent.append(now)
        return True


@dataclass
class Conversation:
    session: Session | None  # None until made, under the lock (RapportHandlers.held)
    last_used: float
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    channel: discord.abc.Messageable | None = None  # where it is held (a retry answers there)


class RapportHandlers:
    """The event handlers; mixed into discord.Client or AutoShardedClient by make_client."""

    def setup_rapport(
        self, store: Store, policy_source, config: DiscordConfig, safety: SafetyFilter | None
    ) -> None:
        self.store = store
        self.safety = safety  # checks every reply before it is sent (bot.safety)
        self.policy_source = policy_source
        self.settings = config
        self.allowed = config.channel_ids()
        self.limiter = RateLimiter(config.rate_limit_per_minute)
        self.conversations: dict[tuple[int, int], Conversation] = {}
        self.vote_lock = asyncio.Lock()
        # generation slots: five reply threads at once each held the GIL in turn and the
        # loop waited behind them all (122 ms stalls in bench/soak.py's hour, py-spy --gil)
        self.writing = asyncio.Semaphore(config.replies_at_once)
        self.tree = app_commands.CommandTree(self)
        register_commands(self)

    async def setup_hook(self) -> None:
        await self.tree.sync()

    # -- messages -------------------------------------------------------------------

    def wants(self, message: discord.Message) -> bool:
        """Whether a message is for the bot (see module doc)."""
        if message.author.bot:
            return False  # other bots and itself
        if isinstance(message.channel, discord.DMChannel):
            return True
        if self.allowed and message.channel.id not in self.allowed:
            return False
        if self.user in message.mentions:
            return True
        ref = message.reference
        resolved = getattr(ref, "resolved", None) if ref else None
        return bool(resolved is not None and getattr(resolved, "author", None) == self.user)

    def text_of(self, message: discord.Message) -> str:
        text = message.content
        if self.user is not None:
            for form in (f"<@{self.user.id}>", f"<@!{self.user.id}>"):
                text = text.replace(form, "")
        return text.strip()

    @contextlib.asynccontextmanager
    async def held(self, channel_id: int, user_id: int) -> AsyncIterator[Conversation]:
        """The conversation of (channel, user) with its lock held, its session made (or
        restarted after the idle timeout) under the lock. The lock is asked for before
        any await, so a user's events take it in the order they arrived: two quick
        messages are answered and logged in the order sent (making the session in a
        thread first let the second overtake the first; found by bench/soak.py)."""
        key = (channel_id, user_id)
        current = self.conversations.get(key)
        if current is None:
            current = self.conversations[key] = Conversation(None, time.monotonic())
        async with current.lock:
            now = time.monotonic()
            if current.session is None:
                current.session = await asyncio.to_thread(
                    Session,
                    self.store,
                    self.policy_source,
                    PLATFORM,
                    str(user_id),
                    str(channel_id),
                    self.safety,
                )
            elif now - current.last_used > self.settings.idle_minutes * 60:
                await asyncio.to_thread(current.session.new_conversation, "idle")
            current.last_used = now
            yield current

    async def on_message(self, message: discord.Message) -> None:
        if not self.wants(message):
            return  # not addressed to us, or from a bot
        text = self.text_of(message)
        if not text:
            return  # a bare mention: nothing to answer
        if not self.limiter.allow(message.author.id):
            await message.reply("You're writing faster than I can think. Give me a minute?")
            return
        async with self.held(message.channel.id, message.author.id) as conversation:
            conversation.channel = message.channel
            try:
                async with message.channel.typing(), self.writing:
                    reply = await asyncio.to_thread(conversation.session.respond, text)
            except RapportError as e:
                log.error("reply failed in channel %s: %s", message.channel.id, e)
                await message.reply(f"Sorry, I couldn't answer that: {e}")
                return
            first = await message.reply(split_message(reply.shown)[0], mention_author=False)
            await self.deliver(conversation, reply, first)

    async def deliver(
        self, conversation: Conversation, reply: Reply, first: discord.Message | None = None
    ) -> None:
        """Send a reply's parts (``first``: its first part, already sent), link them to the
        logged turn, add the reaction buttons, and pass on the session's notice."""
        channel = conversation.channel
        parts = split_message(reply.shown)
        sent = [first or await channel.send(parts[0])]
        for part in parts[1:]:
            sent.append(await channel.send(part))
        if reply.message_id is not None:
            await asyncio.to_thread(
                self.store.link_platform_message,
                PLATFORM,
                [str(m.id) for m in sent],
                reply.message_id,
            )
            for emoji in (*VOTES, RETRY):
                await sent[-1].add_reaction(emoji)
        if conversation.session.notice:
            await channel.send(conversation.session.notice)

    # -- votes ----------------------------------------------------------------------

    async def vote_from(self, payload: discord.RawReactionActionEvent, added: bool) -> None:
        if self.user is not None and payload.user_id == self.user.id:
            return  # the bot's own 👍/👎/🔁
        if str(payload.emoji) == RETRY:
            if added:  # taking a 🔁 back undoes nothing: both replies were shown
                await self.retry_from(payload)
            return
        value = VOTES.get(str(payload.emoji))
        if value is None:
            return  # some other emoji
        # in the order Discord sent them: threads could run a quick 👍-on, 👍-off
        # backwards and keep the vote (found by bench/soak.py)
        async with self.vote_lock:
            await asyncio.to_thread(self.record_vote, payload, value, added)

    def record_vote(self, payload, value: int, added: bool) -> None:
        message_id = self.store.message_for_platform(PLATFORM, str(payload.message_id))
        if message_id is None:
            return  # not one of the bot's replies
        user = self.store.ensure_user(PLATFORM, str(payload.user_id))
        if self.store.is_opted_out(user):
            return
        try:
            if added:
                self.store.vote(message_id, user, value)
            elif self.store.votes(message_id).get(user) == value:
                self.store.vote(message_id, user, 0)  # withdrawn
        except NotFound:
            return  # the reply was deleted meanwhile (its user's /forget): nothing to vote on

    async def retry_from(self, payload: discord.RawReactionActionEvent) -> None:
        """🔁: another reply instead of the latest one (see module doc)."""
        if (payload.channel_id, payload.user_id) not in self.conversations:
            return  # no conversation of this user here: not theirs to retry
        message_id = await asyncio.to_thread(
            self.store.message_for_platform, PLATFORM, str(payload.message_id)
        )
        if message_id is None:
            return  # not one of the bot's replies
        async with self.held(payload.channel_id, payload.user_id) as conversation:
            if conversation.channel is None:
                return  # no message of theirs seen since the conversation started
            try:
                async with conversation.channel.typing(), self.writing:
                    reply = await asyncio.to_thread(conversation.session.retry, None, message_id)
            except RapportError as e:
                await conversation.channel.send(f"I can't retry that: {e}")
                return
            await self.deliver(conversation, reply)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self.vote_from(payload, added=True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self.vote_from(payload, added=False)


def register_commands(client) -> None:
    """The slash commands: each answers ephemerally, deferring before database work."""

    async def in_session(interaction: discord.Interaction, work: Callable[[Session], T]) -> T:
        """``work(session)`` in a thread, under the conversation's lock: a command waits for
        the reply being written to this user, so /forget never deletes a turn whose reply
        is still to be logged, and /new never ends a conversation mid-reply."""
        async with client.held(interaction.channel_id, interaction.user.id) as conversation:
            return await asyncio.to_thread(work, conversation.session)

    @client.tree.command(name="new", description="Start a new conversation with me.")
    async def new(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await in_session(interaction, Session.new_conversation)
        await interaction.followup.send("Fresh start! What's on your mind?", ephemeral=True)

    @client.tree.command(name="forget", description="Delete everything you said and voted.")
    async def forget(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        deleted = await in_session(interaction, Session.forget_me)
        await interaction.followup.send(
            f"Done: I deleted {deleted['messages']} messages and {deleted['votes']} votes "
            "of yours.",
            ephemeral=True,
        )

    @client.tree.command(name="optout", description="Stop logging your messages.")
    async def optout(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await in_session(interaction, lambda session: session.set_opt_out(True))
        await interaction.followup.send(
            "Logging is off: I'll still chat, but nothing you say is saved.", ephemeral=True
        )

    @client.tree.command(name="optin", description="Allow logging your messages again.")
    async def optin(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        await in_session(interaction, lambda session: session.set_opt_out(False))
        await interaction.followup.send("Logging is on again. Thanks!", ephemeral=True)

    @client.tree.command(name="about", description="What I am, what I log and why.")
    async def about(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        # the source may read the store or load a newly deployed model: off the loop
        version = (await asyncio.to_thread(client.policy_source)).version
        await interaction.followup.send(ABOUT.format(version=version), ephemeral=True)

    @client.tree.command(name="rate", description="Rate our conversation, 1 (poor) to 5 (great).")
    @app_commands.describe(**RATING_PROMPTS)
    async def rate(
        interaction: discord.Interaction,
        overall: RatingAnswer,
        fluency: RatingAnswer,
        diversity: RatingAnswer,
        relatedness: RatingAnswer,
        empathy: RatingAnswer,
    ) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        answers = dict(
            overall=overall,
            fluency=fluency,
            diversity=diversity,
            relatedness=relatedness,
            empathy=empathy,
        )
        try:
            replaced = await in_session(interaction, lambda session: session.rate(answers))
        except RapportError as e:
            await interaction.followup.send(f"Not rated: {e}", ephemeral=True)
            return
        await interaction.followup.send(
            "Thanks for rating!" + (" (This replaces your earlier rating.)" if replaced else ""),
            ephemeral=True,
        )

    client.commands_by_name = {c.name: c for c in (new, forget, optout, optin, about, rate)}


class RapportClient(RapportHandlers, discord.Client):
    pass


class ShardedRapportClient(RapportHandlers, discord.AutoShardedClient):
    pass


def make_client(
    store: Store, policy_source, config: DiscordConfig, safety: SafetyFilter | None = None
) -> discord.Client:
    intents = discord.Intents.default()
    intents.message_content = config.message_content_intent
    cls = ShardedRapportClient if config.sharded else RapportClient
    # rapport never joins voice: discord.py's warnings that voice libraries are missing
    # would only worry the person starting the bot
    discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False
    client = cls(intents=intents)
    client.setup_rapport(store, policy_source, config, safety)
    return client


def read_token(config: DiscordConfig, environ: dict | None = None) -> str:
    environ = os.environ if environ is None else environ
    token = environ.get("DISCORD_TOKEN", "").strip()
    if not token and config.token_file:
        try:
            token = Path(config.token_file).expanduser().read_text().strip()
        except OSError as e:
            raise TokenError(
                f"cannot read the token file {config.token_file}: {e.strerror}"
            ) from None
    if not token:
        raise TokenError("no Discord token: set DISCORD_TOKEN or name a file in discord.token_file")
    return token


# How long a thread may hold the GIL before one waiting for it asks for it (CPython's
# default: 5 ms). The event loop waits behind the reply's worker and the database
# threads in turn, a round each: at 5 ms, 85-106 ms stalls in bench/soak.py's hour, all
# waiting for the GIL (one reply generated at a time).
SWITCH_INTERVAL_S = 0.001


def settle_for_serving() -> None:
    """Ready the process to serve: move everything loaded so far (torch, transformers,
    the model: millions of objects) out of the garbage collector's view, or each full
    collection walks them all on the event loop (370 ms stalls in ``bench/soak.py``;
    after this, a few); and hand the GIL on sooner (``SWITCH_INTERVAL_S``)."""
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def run_discord(
    store: Store, policy_source, config: DiscordConfig, safety: SafetyFilter | None = None
) -> None:
    """Connect and serve until interrupted; errors are one line without the token."""
    token = read_token(config)
    client = make_client(store, policy_source, config, safety)
    settle_for_serving()

    async def main() -> None:
        async with client:
            await client.start(token)

    try:
        asyncio.run(main())
    except discord.LoginFailure:
        raise TokenError("Discord rejected the token; check DISCORD_TOKEN") from None
    except discord.PrivilegedIntentsRequired:
        raise TokenError(
            "the message-content intent is not enabled for this bot in the developer "
            "portal; enable it or set discord.message_content_intent = false"
        ) from None
    except (OSError, discord.HTTPException, discord.GatewayNotFound) as e:
        raise TokenError(f"cannot reach Discord ({type(e).__name__})") from None
