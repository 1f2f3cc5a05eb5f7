"""The outbox pump on SQLite and PostgreSQL: leases held through slow deliveries, classified failures,
retries until a deadline, and `personabot outbox` to look at and requeue what did not go out."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from bot.delivery import OutboxPump
from bot.events import Outgoing
from bot.store import Store, jobs
from bot.store.models import OutboxDelivery
from tests.test_jobs import add_jobs


async def queue_replies(store: Store, count: int, platform: str = "console") -> list[int]:
    """`count` replies written by a worker, waiting in the outbox; returns their outbox ids."""
    await add_jobs(store, count)
    async with store.transaction() as session:
        claimed = await jobs.claim(session, owner="w", limit=count, lease_seconds=60, max_attempts=3)
        for job in claimed:
            await jobs.complete(session, job, text=f"reply {job.id}", persona="assistant", platform=platform)
        rows = await session.execute(select(OutboxDelivery.id).order_by(OutboxDelivery.id))
        return list(rows.scalars())


class SlowPlatform:
    """Takes `seconds` to post each reply and records every post."""

    platform = "console"

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds
        self.posted: list[Outgoing] = []

    async def deliver(self, reply: Outgoing) -> list[str]:
        await asyncio.sleep(self.seconds)
        self.posted.append(reply)
        return [f"p{reply.outbox_id}.{len(self.posted)}"]


async def test_a_delivery_that_outlives_its_lease_keeps_it(store: Store) -> None:
    """A slow delivery renews its lease, so a second pump polling meanwhile never claims (and posts)
    the same reply again."""
    (outbox_id,) = await queue_replies(store, 1)
    platform = SlowPlatform(seconds=1.5)
    slow = OutboxPump(store, platform, lease_seconds=0.6)  # type: ignore[arg-type]
    other_platform = SlowPlatform()
    other = OutboxPump(store, other_platform, lease_seconds=0.6)  # type: ignore[arg-type]
    other.owner = "other-process:console"

    async def poll_other() -> None:
        for _ in range(30):
            await other.flush()
            await asyncio.sleep(0.05)

    posted, _ = await asyncio.gather(slow.flush(), poll_other())
    assert posted == 1 and [p.outbox_id for p in platform.posted] == [outbox_id]
    assert other_platform.posted == []
    async with store.transaction() as session:
        row = await session.get(OutboxDelivery, outbox_id)
        assert row is not None and row.status == "delivered" and row.attempts == 1
