"""Spec'd fakes of discord.py classes, in the manner of python-discord's test helpers:
each fake is a mock whose spec is the real class, so a handler that reads an attribute
or method the real object lacks fails the test. No network."""

from __future__ import annotations

import contextlib
import itertools
from unittest.mock import AsyncMock, MagicMock, NonCallableMagicMock

import discord

_ids = itertools.count(10**17)


def fake_user(bot: bool = False, spec=discord.Member) -> NonCallableMagicMock:
    user = NonCallableMagicMock(spec=spec)
    user.id = next(_ids)
    user.bot = bot
    user.mention = f"<@{user.id}>"
    return user


def fake_client_user() -> NonCallableMagicMock:
    return fake_user(bot=True, spec=discord.ClientUser)


def fake_channel(dm: bool = False) -> NonCallableMagicMock:
    channel = NonCallableMagicMock(spec=discord.DMChannel if dm else discord.TextChannel)
    channel.id = next(_ids)
    channel.sent = []

    async def send(content=None, **kwargs):
        message = fake_sent_message(content, channel)
        channel.sent.append(message)
        return message

    channel.send = AsyncMock(side_effect=send)

    @contextlib.asynccontextmanager
    async def typing():
        channel.typing_entered = True
        yield

    channel.typing = MagicMock(side_effect=typing)
    channel.typing_entered = False
    return channel


def fake_sent_message(content, channel) -> NonCallableMagicMock:
    message = NonCallableMagicMock(spec=discord.Message)
    message.id = next(_ids)
    message.content = content
    message.channel = channel
    message.reactions_added = []

    async def add_reaction(emoji):
        message.reactions_added.append(emoji)

    message.add_reaction = AsyncMock(side_effect=add_reaction)
    return message


def fake_message(content: str, author, channel, mentions=(), reference=None):
    message = NonCallableMagicMock(spec=discord.Message)
    message.id = next(_ids)
    message.content = content
    message.author = author
    message.channel = channel
    message.mentions = list(mentions)
    message.reference = reference

    async def reply(content=None, **kwargs):
        return await channel.send(content)

    message.reply = AsyncMock(side_effect=reply)
    return message


def fake_reaction(message_id: int, user_id: int, emoji: str, channel_id: int | None = None):
    payload = NonCallableMagicMock(spec=discord.RawReactionActionEvent)
    payload.message_id = message_id
    payload.user_id = user_id
    payload.channel_id = channel_id if channel_id is not None else next(_ids)
    payload.emoji = discord.PartialEmoji(name=emoji)
    return payload


def fake_interaction(user, channel):
    interaction = NonCallableMagicMock(spec=discord.Interaction)
    interaction.user = user
    interaction.channel_id = channel.id
    interaction.response = NonCallableMagicMock(spec=discord.InteractionResponse)
    interaction.response.defer = AsyncMock()
    interaction.response.send_message = AsyncMock()
    interaction.followup = NonCallableMagicMock(spec=discord.Webhook)
    interaction.followup.send = AsyncMock()
    return interaction
