"""Running personabot's BotApp with the Discord adapter against the fake Discord, for tests.

`start_bot` wires the real pieces (dispatcher, store, worker, outbox pump, streaming relay) around a
`DiscordAdapter` pointed at a `FakeDiscord`, with a scripted backend and quick polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters.discord import DiscordAdapter
from bot.app import BotApp
from bot.config import Settings, load_settings
from bot.store import Store
from bot.store.models import OutboxDelivery
from personas.registry import Persona, PersonaRegistry
from personas.spec import PersonaSpec
from tests.fakes.backend import ScriptedBackend, last_user_text
from tests.fakes.discord_server import FakeDiscord, Json
from tests.tiny import byte_level_tokenizer


def personas() -> PersonaRegistry:
    """Two personas on the ChatML template the scripted backend reads."""
    specs = [
        PersonaSpec(
            slug="assistant", name="Assistant", system_prompt="Be helpful.", template="chatml", dialogues=[]
        ),
        PersonaSpec(
            slug="pirate", name="Pirate", system_prompt="Talk like a pirate.", template="chatml", dialogues=[]
        ),
    ]
    return PersonaRegistry([Persona(spec, Path("."), "test") for spec in specs])


@functools.cache
def shared_tokenizer() -> Any:
    """Built once per run: training the tiny tokenizer takes longer than a whole Discord test."""
    return byte_level_tokenizer()


def scripted(reply_fn: Callable[[str], str] | None = None, *, delay: float = 0.0) -> ScriptedBackend:
    return ScriptedBackend(reply_fn or echo_last_line, tokenizer=shared_tokenizer(), delay=delay)


def echo_last_line(prompt: str) -> str:
    """`echo -> <the newest user line>` (not `echo:`, which a group reply would lose as a speaker tag)."""
    return "echo -> " + last_user_text(prompt).splitlines()[-1]


@dataclass
class Bot:
    fake: FakeDiscord
    app: BotApp
    adapter: DiscordAdapter
    backend: ScriptedBackend
    store: Store

    async def stop(self) -> None:
        await self.app.stop(flush_timeout=2.0)

    async def replies(self, channel: Json, count: int, timeout: float = 10.0) -> list[Json]:
        """Wait for the bot to have posted `count` messages in `channel`; returns them."""
        await self.fake.wait_until(lambda: len(self.fake.posted(channel)) >= count, timeout)
        return self.fake.posted(channel)

    async def delivered(self, count: int, timeout: float = 10.0) -> list[OutboxDelivery]:
        """Wait until `count` outbox rows are delivered; returns them."""
        async with asyncio.timeout(timeout):
            while len(rows := await self.rows(OutboxDelivery, OutboxDelivery.status == "delivered")) < count:
                await asyncio.sleep(0.02)
        return rows

    async def rows(self, model: Any, *where: Any) -> list[Any]:
        async with self.store.transaction() as session:
            return list((await session.execute(select(model).where(*where).order_by(model.id))).scalars())


async def start_bot(
    store: Store,
    fake: FakeDiscord,
    *,
    settings: Settings | None = None,
    backend: ScriptedBackend | None = None,
    heartbeats: bool = False,
    **adapter_options: Any,
) -> Bot:
    settings = settings or load_settings(worker={"poll_seconds": 0.05})
    backend = backend or scripted()
    options: dict[str, Any] = {
        "api_base": fake.api_base,
        "gateway_url": fake.gateway_url,
        "guild_ready_timeout": 0.05,
        "ready_timeout": 10.0,
    }
    options.update(adapter_options)
    adapter = DiscordAdapter.from_settings(settings, **options)
    app = BotApp(settings, store, personas(), [adapter], backend, heartbeats=heartbeats)
    for pump in app.pumps:  # quick polling and retries, so each test takes about a second
        pump.poll_seconds = 0.05
        pump.settings = pump.settings.model_copy(
            update={"retry_backoff_seconds": 0.05, "retry_max_seconds": 0.2}
        )
    await app.start()
    return Bot(fake, app, adapter, backend, store)


@contextlib.asynccontextmanager
async def fake_discord(monkeypatch: pytest.MonkeyPatch, **options: Any) -> AsyncIterator[FakeDiscord]:
    """A started fake Discord whose token is in `DISCORD_TOKEN`, as an operator would set it."""
    server = await FakeDiscord(**options).start()
    monkeypatch.setenv("DISCORD_TOKEN", server.token)
    try:
        yield server
    finally:
        await server.close()


def mention(user: Json) -> str:
    return f"<@{user['id']}>"


@dataclass
class World:
    guild: Json
    general: Json
    alice: Json
    bob: Json


def build_world(fake: FakeDiscord) -> World:
    guild = fake.add_guild("Test Guild")
    general = fake.add_channel(guild, "general")
    alice = fake.add_user("alice", global_name="Alice")
    bob = fake.add_user("bob", global_name="Bob")
    fake.add_member(guild, alice)
    fake.add_member(guild, bob, nick="Bobby")
    return World(guild, general, alice, bob)
