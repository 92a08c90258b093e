"""Spec'd fakes of discord.py classes, in the manner of python-discord's test helpers:
each fake is a mock whose spec is the real class, so a handler that reads an attribute
or method the real object lacks fails the test. No network.

``light=True`` (the soak, bench/soak.py, which makes thousands a minute) keeps the spec
but drops what only a unit test asserts on: a ``NonCallableMock`` instead of a
``NonCallableMagicMock`` (no ~60 magic-method proxies each) and plain coroutine
functions for the methods instead of ``AsyncMock`` (no call records). A used message and
its reply are then ~40 objects for the garbage collector instead of ~300: the
collector's full passes over the harness's own mocks were the soak's largest stalls."""

from __future__ import annotations

import contextlib
import itertools
from unittest.mock import AsyncMock, MagicMock, NonCallableMagicMock, NonCallableMock

import discord

_ids = itertools.count(10**17)


def _spec_fake(spec, light: bool):
    return NonCallableMock(spec=spec) if light else NonCallableMagicMock(spec=spec)


def _method(coroutine_function, light: bool):
    """The fake's method: the coroutine function itself, or an AsyncMock running it."""
    return coroutine_function if light else AsyncMock(side_effect=coroutine_function)


def fake_user(bot: bool = False, spec=discord.Member) -> NonCallableMagicMock:
    user = NonCallableMagicMock(spec=spec)
    user.id = next(_ids)
    user.bot = bot
    user.mention = f"<@{user.id}>"
    return user


def fake_client_user() -> NonCallableMagicMock:
    return fake_user(bot=True, spec=discord.ClientUser)


def fake_channel(dm: bool = False, light: bool = False) -> NonCallableMagicMock:
    channel = NonCallableMagicMock(spec=discord.DMChannel if dm else discord.TextChannel)
    channel.id = next(_ids)
    channel.sent = []

    async def send(content=None, **kwargs):
        message = fake_sent_message(content, channel, light)
        channel.sent.append(message)
        return message

    channel.send = _method(send, light)

    @contextlib.asynccontextmanager
    async def typing():
        channel.typing_entered = True
        yield

    channel.typing = typing if light else MagicMock(side_effect=typing)
    channel.typing_entered = False
    return channel


def fake_sent_message(content, channel, light: bool = False) -> NonCallableMagicMock:
    message = _spec_fake(discord.Message, light)
    message.id = next(_ids)
    message.content = content
    message.channel = channel
    message.reactions_added = []

    async def add_reaction(emoji):
        message.reactions_added.append(emoji)

    message.add_reaction = _method(add_reaction, light)
    return message


def fake_message(content: str, author, channel, mentions=(), reference=None, light=False):
    message = _spec_fake(discord.Message, light)
    message.id = next(_ids)
    message.content = content
    message.author = author
    message.channel = channel
    message.mentions = list(mentions)
    message.reference = reference

    async def reply(content=None, **kwargs):
        return await channel.send(content)

    message.reply = _method(reply, light)
    return message


def fake_reaction(message_id: int, user_id: int, emoji: str, channel_id=None, light=False):
    payload = _spec_fake(discord.RawReactionActionEvent, light)
    payload.message_id = message_id
    payload.user_id = user_id
    payload.channel_id = channel_id if channel_id is not None else next(_ids)
    payload.emoji = discord.PartialEmoji(name=emoji)
    return payload


def fake_interaction(user, channel, light: bool = False):
    interaction = _spec_fake(discord.Interaction, light)
    interaction.user = user
    interaction.channel_id = channel.id
    interaction.response = _spec_fake(discord.InteractionResponse, light)
    interaction.followup = _spec_fake(discord.Webhook, light)

    async def nothing(*args, **kwargs):
        return None

    interaction.response.defer = _method(nothing, light) if light else AsyncMock()
    interaction.response.send_message = _method(nothing, light) if light else AsyncMock()
    interaction.followup.send = _method(nothing, light) if light else AsyncMock()
    return interaction
