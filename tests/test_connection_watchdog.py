"""A platform connection that dies is loud: logged with its exception, shown as failed in
`personabot status`, restored, and when it cannot be restored `personabot run` exits non-zero."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.launch import EXIT_CONNECTION_LOST, run_bot
from bot.status import collect_status, render_status
from bot.store import Store
from tests.fakes.discord_harness import build_world, fake_discord, mention, start_bot
from tests.fakes.discord_server import FakeDiscord

# What discord.py 2.x's parser needs and an older (or newer) Discord may leave out: its
# `Interaction.__init__` reads data["attachment_size_limit"] and raises KeyError without it.
BREAKING_FIELD = "attachment_size_limit"


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    async with fake_discord(monkeypatch) as server:
        yield server


async def send_breaking_event(fake: FakeDiscord, channel: dict, user: dict) -> None:
    data = fake.interaction(channel, user, "help")
    del data[BREAKING_FIELD]
    await fake.dispatch("INTERACTION_CREATE", data)


async def adapter_status_once(store: Store, state: str, timeout: float = 10.0) -> dict:
    """The adapter's status entry as soon as it reports `state` (the last one seen on timeout)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        components = (await collect_status(store))["components"]
        (adapter,) = [c for c in components if c["kind"] == "adapter"]
        if adapter["state"] == state or loop.time() > deadline:
            assert adapter["state"] == state
            return adapter
        await asyncio.sleep(0.05)


async def test_a_parser_error_is_logged_shown_and_the_gateway_reconnects(
    sqlite_store: Store, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    w = build_world(fake)
    settings = load_settings(worker={"poll_seconds": 0.05}, run={"reconnect_backoff_seconds": 0.05})
    bot = await start_bot(sqlite_store, fake, settings=settings, heartbeats=True)
    try:
        with caplog.at_level(logging.ERROR, logger="bot.watchdog"):
            await send_breaking_event(fake, w.general, w.alice)
            await fake.wait_until(lambda: fake.identify_count == 2)  # a fresh session
        (record,) = [r for r in caplog.records if r.name == "bot.watchdog"]
        assert "discord connection ended unexpectedly" in record.getMessage()
        assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)

        # Still answering after the reconnect.
        await fake.say(w.general, w.bob, f"{mention(fake.bot)} still there?", mentions=[fake.bot])
        (reply,) = await bot.replies(w.general, 1)
        assert reply["content"] == "echo -> still there?"

        # Status says it runs again, and what broke it. The watchdog records "running" once
        # reconnect() has returned, which can be a moment after the first reply is posted.
        adapter = await adapter_status_once(sqlite_store, "running")
        assert BREAKING_FIELD in adapter["last_failure"]["error"]
    finally:
        await bot.stop()


async def test_a_connection_that_cannot_be_restored_fails_the_process(
    fake: FakeDiscord, tmp_path: Path
) -> None:
    w = build_world(fake)
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'bot.db'}",
        worker={"enabled": False},
        scheduler={"enabled": False},
        run={"reconnect_attempts": 2, "reconnect_backoff_seconds": 0.05},
        discord={"api_base": fake.api_base, "gateway_url": fake.gateway_url, "ready_timeout_seconds": 3},
    )
    lines: list[str] = []
    running = asyncio.create_task(run_bot(settings, say=lines.append))
    await fake.wait_until(lambda: "discord: started" in lines, timeout=15)  # the watchdog is watching
    fake.gateway_down = True  # the reconnects cannot get a session
    await send_breaking_event(fake, w.general, w.alice)
    assert await asyncio.wait_for(running, 20) == EXIT_CONNECTION_LOST
    assert "could not be restored" in lines[-1] and BREAKING_FIELD in lines[-1]

    store = Store(settings.resolved_database_url)
    try:
        report = await collect_status(store)
    finally:
        await store.close()
    (adapter,) = [c for c in report["components"] if c["kind"] == "adapter"]
    assert adapter["state"] == "failed" and BREAKING_FIELD in adapter["error"]
    assert f"failed (KeyError: '{BREAKING_FIELD}')" in render_status(report)
