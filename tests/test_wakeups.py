"""Wake-ups instead of idle polling: with polls far slower than the test allows, a written job wakes
the worker and a written reply wakes the outbox pump, in one process (every backend) and across
processes (PostgreSQL's NOTIFY)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from bot.app import BotApp
from bot.config import load_settings
from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming
from bot.store import Store
from bot.store.models import ReplyJob
from tests.fakes.backend import ScriptedBackend
from tests.test_jobs import add_jobs
from tests.test_outbox_pump import SlowPlatform
from tests.test_worker import personas_dir, registry_of
from tests.test_worker_processes import start_worker, workers_beating, write_config

SLOW_POLL = 60.0  # no answer in this test may come from a poll


class Platform(SlowPlatform):
    async def start(self, on_event) -> None:  # type: ignore[no-untyped-def]
        self.on_event = on_event

    async def typing(self, channel: ChannelRef) -> None:
        return None

    async def stop_receiving(self) -> None:
        return None

    async def stop(self) -> None:
        return None


async def test_a_message_wakes_the_worker_and_its_reply_wakes_the_pump(store: Store, tmp_path: Path) -> None:
    folder = personas_dir(tmp_path / "personas", alpha=8)
    settings = load_settings(
        default_persona="alpha",
        personas_dir=str(folder),
        worker={"poll_seconds": SLOW_POLL},
        access={"user_cooldown_per_minute": 0, "channel_cooldown_per_minute": 0},
    )
    platform = Platform()
    app = BotApp(settings, store, registry_of(folder), [platform], ScriptedBackend())  # type: ignore[list-item]
    for pump in app.pumps:
        pump.poll_seconds = SLOW_POLL
    await app.start()
    try:
        await asyncio.sleep(0.5)  # both loops polled once and wait now
        for n in range(3):
            sent = time.monotonic()
            await platform.on_event(
                Incoming(
                    platform="console",
                    channel=ChannelRef("console", "c", ChannelKind.DIRECT),
                    author=AuthorRef("console", "ada", "Ada"),
                    text=f"hello {n}",
                    platform_message_id=f"m{n}",
                )
            )
            async with asyncio.timeout(10):
                while len(platform.posted) <= n:
                    await asyncio.sleep(0.01)
            assert time.monotonic() - sent < 5.0
    finally:
        await app.stop(flush_timeout=0)
    assert [p.reply_to for p in platform.posted] == ["m0", "m1", "m2"]


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_job_written_by_another_process_wakes_the_worker(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    """`personabot worker` polls once a minute here; a job written in this process reaches it through
    NOTIFY and is answered in seconds."""
    config = write_config(tmp_path, db_url, lease=f"lease_seconds = 6\npoll_seconds = {SLOW_POLL}")
    config.write_text(config.read_text().replace("poll_seconds = 0.05\n", ""))
    proc = start_worker(config, tmp_path / "w.log")
    try:
        deadline = time.monotonic() + 120
        while not await workers_beating(store, [proc]):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "w.log").read_text()
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # polled once, waiting now
        for round_ in range(2):
            (job_id,) = await add_jobs(store, 1, channel=f"r{round_}-")
            written = time.monotonic()
            while True:
                async with store.transaction() as session:
                    status = (
                        await session.execute(select(ReplyJob.status).where(ReplyJob.id == job_id))
                    ).scalar_one()
                if status == "done":
                    break
                assert time.monotonic() - written < 15, (tmp_path / "w.log").read_text()[-2000:]
                await asyncio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
