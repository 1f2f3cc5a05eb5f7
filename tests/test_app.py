"""The whole in-process path: adapter -> dispatcher -> store -> worker -> outbox -> adapter."""

from __future__ import annotations

import asyncio
import io

from adapters.console import ConsoleAdapter
from bot.app import BotApp
from bot.config import load_settings
from bot.store import Store
from personas.registry import PersonaRegistry
from tests.fakes.backend import ScriptedBackend


async def _wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_console_message_is_answered_through_the_store(store: Store) -> None:
    out = io.StringIO()
    console = ConsoleAdapter("app-test", user="ada", stdout=out, interactive=False)
    app = BotApp(load_settings(), store, PersonaRegistry.discover(), [console], ScriptedBackend())
    await app.start()
    result = await console.send("hello there")
    assert result.job_ids and result.stored
    await _wait_for(lambda: "echo -> hello there" in out.getvalue())
    await app.stop()
    assert out.getvalue() == "echo -> hello there\n"
