"""A short database outage (PostgreSQL behind a proxy that drops every connection for a moment) gives
one WARNING line per component while it lasts and one line when it recovers, not a traceback per
retry; and nothing is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from bot.delivery import OutboxPump
from bot.outage import OutageLog
from bot.store import Store
from bot.worker import Worker
from tests.fakes.backend import ScriptedBackend
from tests.test_outbox_pump import SlowPlatform, queue_replies
from tests.test_worker import personas_dir, registry_of, settings


class Proxy:
    """A TCP proxy to the database that can cut every connection and refuse new ones for a while."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Tracked from the accept, not from the upstream connect: a connection accepted just before a
        # cut must not slip through it (a component whose pooled connection survived the blip would
        # never see the outage, and the test would wait for a recovery line that never comes).
        self.writers.add(writer)
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        if writer not in self.writers:  # cut while connecting upstream
            up_writer.transport.abort()
            return
        self.writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_database_blip_is_one_warning_and_one_recovery_line_per_component(
    store: Store, db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_url(db_url)
    proxy = Proxy(url.host or "127.0.0.1", url.port or 5432)
    await proxy.open()
    through = Store(url.set(port=proxy.port).render_as_string(hide_password=False))
    platform = SlowPlatform()
    pump = OutboxPump(through, platform, poll_seconds=0.05)  # type: ignore[arg-type]
    registry = registry_of(personas_dir(tmp_path / "personas", alpha=4))
    worker = Worker(settings(), through, registry, ScriptedBackend())
    stop = asyncio.Event()
    caplog.set_level(logging.INFO)
    tasks = [asyncio.create_task(pump.run(stop)), asyncio.create_task(worker.run(stop))]
    try:
        await asyncio.sleep(0.5)
        await proxy.cut()
        await asyncio.sleep(2.0)  # the blip
        await proxy.open()
        ids = await queue_replies(store, 2)  # written during recovery, delivered once it is over
        async with asyncio.timeout(20):
            # Delivered, and every component has said it is back (each retries on its own backoff).
            while (
                len(platform.posted) < len(ids)
                or sum("the database is back" in r.getMessage() for r in caplog.records) < 2
            ):
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await through.close()
        await proxy.cut()
    mine = [r for r in caplog.records if r.name in ("bot.delivery", "bot.worker.core")]
    lines = [f"{r.levelname} {r.name} {r.getMessage()}" for r in mine]
    for name, component in (("bot.delivery", "outbox pump for console"), ("bot.worker.core", "worker")):
        of = [
            r for r in mine if r.name == name and r.levelno >= logging.INFO and "batch:" not in r.getMessage()
        ]
        warned = [r for r in of if r.levelno == logging.WARNING]
        assert len(warned) == 1 and warned[0].getMessage().startswith(
            f"{component}: the database is unreachable"
        ), lines
        assert not any(r.levelno >= logging.ERROR or r.exc_info for r in of), lines
        recovered = [r for r in of if "the database is back after" in r.getMessage()]
        assert len(recovered) == 1, lines
    assert sorted(p.outbox_id for p in platform.posted) == ids


def test_an_outage_that_lasts_escalates_once_and_a_bug_is_never_quiet(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    outage = OutageLog("pump", logging.getLogger("test.outage"), escalate_after=60, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "test.outage")
    for _ in range(100):  # two minutes of refused connections
        assert 0 < outage.failed(ConnectionRefusedError(111, "Connection refused")) <= 5.0
        now[0] += 1.2
    outage.ok()
    outage.failed(KeyError("a bug, not an outage"))
    levels = [(r.levelname, r.getMessage().split(";")[0]) for r in caplog.records]
    assert levels == [
        (
            "WARNING",
            "pump: the database is unreachable (ConnectionRefusedError: [Errno 111] Connection refused)",
        ),
        ("ERROR", "pump: the database has been unreachable for 60 s"),
        ("INFO", "pump: the database is back after 120.0 s"),
        ("ERROR", "pump failed"),
    ]
    assert caplog.records[1].exc_info and caplog.records[3].exc_info
