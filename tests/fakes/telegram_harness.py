"""Running the whole bot (BotApp: dispatcher, worker, outbox) on Telegram against the fake Bot API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from adapters.telegram import TelegramAdapter
from bot.app import BotApp
from bot.config import load_settings
from bot.store import Store
from bot.store.models import Channel, Message
from personas.registry import PersonaRegistry
from tests.fakes.backend import ScriptedBackend
from tests.fakes.telegram_server import TOKEN, FakeBotAPI, FakeChat, FakeUser

# A persona of the tests' own, so keyword and greeting checks do not depend on the bundled ones.
PERSONA_TOML = """
name = "Polly"
description = "A parrot that repeats what it hears."
greeting = "Squawk! Polly here. Say something and I'll say it back."
template = "model"
dialogues = []

[triggers]
keywords = ["cracker"]
"""

# The chat the harness uses as a barrier: a command there is answered only after every update
# before it was handled (PTB handles one update at a time).
BARRIER_USER = FakeUser(999_001, "Barrier")
BARRIER_CHAT = FakeChat.private(BARRIER_USER)


def write_personas(root: Path) -> Path:
    folder = root / "personas" / "parrot"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "persona.toml").write_text(PERSONA_TOML, encoding="utf-8")
    return root / "personas"


@dataclass
class TelegramBot:
    api: FakeBotAPI
    app: BotApp
    adapter: TelegramAdapter
    store: Store
    backend: ScriptedBackend

    async def settle(self) -> None:
        """Wait until every update sent so far has been handled."""
        before = len(self.api.bot_messages(BARRIER_CHAT.id))
        self.api.send(BARRIER_CHAT, BARRIER_USER, "/help")
        await self.api.wait_for(lambda: len(self.api.bot_messages(BARRIER_CHAT.id)) > before)

    async def reply_in(self, chat_id: int, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until the bot has posted `count` messages in `chat_id`; returns them."""
        await self.api.wait_for(lambda: len(self.api.bot_messages(chat_id)) >= count, timeout)
        return self.api.bot_messages(chat_id)

    async def rows(self, model: Any, *where: Any) -> list[Any]:
        async with self.store.transaction() as session:
            return list((await session.execute(select(model).where(*where))).scalars())

    async def count(self, model: Any, *where: Any) -> int:
        async with self.store.transaction() as session:
            return (await session.execute(select(func.count()).select_from(model).where(*where))).scalar_one()

    async def wait_until(
        self, value: Callable[[], Awaitable[int]], at_least: int, timeout: float = 10.0
    ) -> None:
        """Wait until an async count (e.g. of delivered outbox rows) reaches `at_least`."""
        async with asyncio.timeout(timeout):
            while await value() < at_least:
                await asyncio.sleep(0.02)

    async def user_messages(self, chat_id: int) -> list[Message]:
        async with self.store.transaction() as session:
            rows = await session.execute(
                select(Message)
                .join(Channel, Channel.id == Message.channel_id)
                .where(Channel.external_id == str(chat_id), Message.role == "user")
                .order_by(Message.id)
            )
            return list(rows.scalars())


@asynccontextmanager
async def running_bot(
    store: Store,
    api: FakeBotAPI,
    tmp_path: Path,
    *,
    access: dict[str, Any] | None = None,
    backend: ScriptedBackend | None = None,
    worker: bool = True,
    **adapter_kw: Any,
) -> AsyncIterator[TelegramBot]:
    """A BotApp with a Telegram adapter pointed at `api`, polling fast, retrying fast; with
    `worker=False` it runs no worker (a separate worker answers, as in a scaled-out deployment)."""
    settings = load_settings(
        default_persona="parrot",
        personas_dir=str(write_personas(tmp_path)),
        worker={"poll_seconds": 0.02, "retry_backoff_seconds": 0.05},
        access={"user_cooldown_per_minute": 0, "channel_cooldown_per_minute": 0, **(access or {})},
    )
    registry = PersonaRegistry.discover(settings.personas_dir)
    adapter_kw.setdefault("base_url", api.base_url)
    adapter_kw.setdefault("retry_backoff", 0.01)
    adapter_kw.setdefault("poll_timeout", 5)
    adapter = TelegramAdapter(TOKEN, **adapter_kw)
    backend = backend or ScriptedBackend()
    app = BotApp(settings, store, registry, [adapter], backend if worker else None)
    for pump in app.pumps:  # the defaults suit production; tests want answers in milliseconds
        pump.poll_seconds = 0.02
        pump.settings = pump.settings.model_copy(
            update={"retry_backoff_seconds": 0.05, "retry_max_seconds": 0.2}
        )
    await app.start()
    try:
        yield TelegramBot(api, app, adapter, store, backend)
    finally:
        await app.stop()
