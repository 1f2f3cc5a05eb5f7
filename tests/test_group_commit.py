"""Group commit: writes that arrive together share one transaction; one that fails fails alone."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import event, func, select

from bot.events import ChannelKind, ChannelRef
from bot.store import Store, conversations
from bot.store.models import Channel


def counting_commits(store: Store) -> list[int]:
    commits = [0]

    def count(_conn: object) -> None:
        commits[0] += 1

    event.listen(store.engine.sync_engine, "commit", count)
    return commits


async def channels(store: Store) -> list[str]:
    async with store.transaction() as session:
        return sorted((await session.execute(select(Channel.external_id))).scalars())


async def test_writes_that_come_together_share_one_commit(store: Store) -> None:
    commits = counting_commits(store)

    def write(n: int):  # type: ignore[no-untyped-def]
        return lambda session: conversations.upsert_channel(
            session, ChannelRef("console", f"c{n:02d}", ChannelKind.DIRECT)
        )

    ids = await asyncio.gather(*(store.group.run(write(n)) for n in range(20)))
    assert len(set(ids)) == 20
    assert await channels(store) == [f"c{n:02d}" for n in range(20)]
    # The first write goes at once, alone; the other 19 came while it was written and share one.
    assert commits[0] == 2


async def test_a_write_that_fails_fails_alone(store: Store) -> None:
    async def write(session, n: int) -> int:  # type: ignore[no-untyped-def]
        channel_id = await conversations.upsert_channel(
            session, ChannelRef("console", f"c{n}", ChannelKind.DIRECT)
        )
        if n == 3:
            raise ValueError("bad input")
        return channel_id

    results = await asyncio.gather(
        *(store.group.run(lambda s, n=n: write(s, n)) for n in range(6)), return_exceptions=True
    )
    assert isinstance(results[3], ValueError)
    assert all(isinstance(r, int) for i, r in enumerate(results) if i != 3)
    assert await channels(store) == ["c0", "c1", "c2", "c4", "c5"]  # c3's write was rolled back


async def test_a_cancelled_caller_s_write_still_commits(store: Store) -> None:
    started = asyncio.Event()

    async def slow(session):  # type: ignore[no-untyped-def]
        started.set()
        await asyncio.sleep(0.2)
        return await conversations.upsert_channel(session, ChannelRef("console", "late", ChannelKind.DIRECT))

    caller = asyncio.create_task(store.group.run(slow))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    async with asyncio.timeout(10):
        while await channels(store) != ["late"]:
            await asyncio.sleep(0.05)
    async with store.transaction() as session:
        assert (await session.execute(select(func.count(Channel.id)))).scalar_one() == 1
