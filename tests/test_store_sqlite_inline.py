"""The default SQLite driver runs statements in the event loop's thread and waits for locks without
blocking the loop (bot/store/sqlite_inline.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy import insert as sa_insert

from bot.events import ChannelKind, ChannelRef
from bot.store import Store, conversations, sqlite_inline
from bot.store.models import Channel


@pytest.mark.parametrize(
    ("scheme", "driver", "busy_timeout_ms"),
    [
        ("sqlite", "inline", 0),  # the default: waits for locks itself, in the loop
        ("sqlite+aiosqlite", "aiosqlite", 30000),  # kept when asked for: SQLite waits, in its thread
    ],
)
async def test_sqlite_urls_pick_their_driver(
    tmp_path: Path, scheme: str, driver: str, busy_timeout_ms: int
) -> None:
    store = Store(f"{scheme}:///{tmp_path / 'bot.db'}")
    await store.upgrade()
    try:
        assert store.engine.dialect.driver == driver
        async with store.transaction() as session:
            channel_id = await conversations.upsert_channel(
                session, ChannelRef("console", "c1", ChannelKind.DIRECT)
            )
        async with store.transaction() as session:
            assert (await session.execute(select(Channel.id))).scalars().all() == [channel_id]
            assert (await session.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await session.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await session.execute(text("PRAGMA busy_timeout"))).scalar() == busy_timeout_ms
    finally:
        await store.close()


async def test_a_locked_database_is_waited_for_without_blocking_the_loop(tmp_path: Path) -> None:
    """Another writer (here a plain sqlite3 connection; another process is the same to SQLite) holds
    the write lock, and releases it from a loop callback. With SQLite's own busy wait in the loop's
    thread the callback could never run: the write would fail after the busy timeout."""
    path = tmp_path / "bot.db"
    store = Store(f"sqlite:///{path}")
    await store.upgrade()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticking = asyncio.create_task(ticker())
        asyncio.get_running_loop().call_later(0.3, other.execute, "COMMIT")
        started = time.monotonic()
        async with store.transaction() as session:
            await conversations.upsert_channel(session, ChannelRef("console", "c1", ChannelKind.DIRECT))
        waited = time.monotonic() - started
        ticking.cancel()
        assert 0.25 < waited < 5
        assert len(ticks) >= 10  # the loop kept running while the write waited
        async with store.transaction() as session:
            assert (await session.execute(select(func.count(Channel.id)))).scalar() == 1
    finally:
        other.close()
        await store.close()


async def test_two_writers_in_one_process_do_not_deadlock(tmp_path: Path) -> None:
    """Two connections of one engine (`Store.transaction` takes turns itself; this is the driver
    beneath): one holds the write lock across an await, the other wants to write meanwhile. The second
    waits asynchronously, so the first can finish and both commit."""
    store = Store(f"sqlite:///{tmp_path / 'bot.db'}")
    await store.upgrade()
    first_wrote = asyncio.Event()

    def insert(name: str):  # type: ignore[no-untyped-def]
        return sa_insert(Channel).values(platform="console", external_id=name, kind="direct")

    async def slow_writer() -> None:
        async with store.engine.begin() as connection:
            await connection.execute(insert("a"))
            first_wrote.set()
            await asyncio.sleep(0.3)  # holding the lock, and yielding to the loop

    async def second_writer() -> None:
        await first_wrote.wait()
        async with store.engine.begin() as connection:
            await connection.execute(insert("b"))

    try:
        started = time.monotonic()
        await asyncio.gather(slow_writer(), second_writer())
        assert time.monotonic() - started < 5
        async with store.transaction() as session:
            assert sorted((await session.execute(select(Channel.external_id))).scalars()) == ["a", "b"]
    finally:
        await store.close()


async def test_a_lock_held_past_the_timeout_is_sqlites_own_error(tmp_path: Path) -> None:
    path = tmp_path / "bot.db"
    connection = await sqlite_inline.connect(str(path), busy_timeout_s=0.2)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await connection.execute("CREATE TABLE t (x INTEGER)")
        await connection.commit()
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            await connection.execute("INSERT INTO t VALUES (1)")
        assert 0.15 < time.monotonic() - started < 2
        other.execute("ROLLBACK")
        await connection.execute("INSERT INTO t VALUES (1)")  # the same connection works afterwards
        await connection.commit()
        assert other.execute("SELECT count(*) FROM t").fetchone() == (1,)
    finally:
        other.close()
        await connection.close()


async def test_errors_other_than_a_lock_are_raised_at_once(tmp_path: Path) -> None:
    connection = await sqlite_inline.connect(str(tmp_path / "bot.db"), busy_timeout_s=30)
    try:
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="no such table"):
            await connection.execute("SELECT * FROM missing")
        assert time.monotonic() - started < 1
    finally:
        await connection.close()
