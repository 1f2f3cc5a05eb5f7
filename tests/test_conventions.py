"""Platform conventions come from the adapters: the dispatcher names no platform."""

from __future__ import annotations

from adapters.console import ConsoleAdapter
from adapters.discord import DiscordAdapter
from adapters.telegram import TelegramAdapter
from bot.config import load_settings
from bot.dispatch import Dispatcher
from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming, PlatformConventions
from bot.store import Store
from personas.registry import PersonaRegistry


def test_adapters_declare_their_conventions() -> None:
    assert DiscordAdapter(None, command_prefix="?").conventions.command_prefixes == "/?"
    assert TelegramAdapter.conventions == PlatformConventions(opening_command="start")
    assert ConsoleAdapter.conventions == PlatformConventions()


async def test_the_dispatcher_reads_commands_the_platforms_way(sqlite_store: Store) -> None:
    conventions = {
        "discord": PlatformConventions(command_prefixes="/!"),
        "chatnet": PlatformConventions(opening_command="hello"),
    }
    dispatcher = Dispatcher(load_settings(), sqlite_store, PersonaRegistry.discover(), conventions)

    async def notice(platform: str, text: str, message_id: str) -> str | None:
        channel = ChannelRef(platform, "c1", ChannelKind.DIRECT)
        event = Incoming(platform, channel, AuthorRef(platform, "u1", "U"), text, message_id)
        return (await dispatcher.handle(event)).notice

    assert (await notice("discord", "!help", "m1") or "").startswith("Commands:")
    # "!" is Discord's: elsewhere it is plain text, stored as a message (no notice).
    assert await notice("console", "!help", "m2") is None
    # A platform's opening command answers with the greeting, as /start does everywhere.
    greeting = await notice("chatnet", "/hello", "m3")
    assert greeting is not None and greeting == await notice("chatnet", "/start", "m4")
    assert await notice("console", "/hello", "m5") is None
