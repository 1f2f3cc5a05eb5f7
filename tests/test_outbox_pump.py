"""The outbox pump on SQLite and PostgreSQL: leases held through slow deliveries, classified failures,
retries until a deadline, and `personabot outbox` to look at and requeue what did not go out."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import select, update

from adapters.base import DeliveryRefused
from bot.cli import main
from bot.config import DeliverySettings
from bot.delivery import OutboxPump
from bot.events import Outgoing, PlatformConventions
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
    conventions = PlatformConventions()

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
    platform = SlowPlatform(seconds=3.0)
    slow = OutboxPump(store, platform, DeliverySettings(lease_seconds=1.0))  # type: ignore[arg-type]
    other_platform = SlowPlatform()
    other = OutboxPump(store, other_platform, DeliverySettings(lease_seconds=1.0))  # type: ignore[arg-type]
    other.owner = "other-process:console"

    async def poll_other() -> None:
        while not platform.posted and not await claimed_by_slow():  # the slow pump claims first
            await asyncio.sleep(0.01)
        for _ in range(50):
            await other.flush()
            await asyncio.sleep(0.05)

    async def claimed_by_slow() -> bool:
        async with store.transaction() as session:
            row = await session.get(OutboxDelivery, outbox_id)
            return row is not None and row.lease_owner == slow.owner

    posted, _ = await asyncio.gather(slow.flush(), poll_other())
    assert posted == 1 and [p.outbox_id for p in platform.posted] == [outbox_id]
    assert other_platform.posted == []
    async with store.transaction() as session:
        row = await session.get(OutboxDelivery, outbox_id)
        assert row is not None and row.status == "delivered" and row.attempts == 1


class RefusingPlatform:
    """Refuses every reply for good, as Discord does for a user with closed DMs."""

    platform = "console"

    async def deliver(self, reply: Outgoing) -> list[str]:
        raise DeliveryRefused("403/50007", "Cannot send messages to this user")


def test_outbox_list_and_retry_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'bot.db'}"
    monkeypatch.setenv("PERSONABOT_DATABASE_URL", url)

    async def refuse_two() -> list[int]:
        store = Store(url)
        await store.upgrade()
        ids = await queue_replies(store, 3)
        await OutboxPump(store, RefusingPlatform()).flush()  # type: ignore[arg-type]
        async with store.transaction() as session:  # the third is still waiting
            await session.execute(
                update(OutboxDelivery)
                .where(OutboxDelivery.id == ids[2])
                .values(status="pending", error=None, error_code=None, attempts=0)
            )
        await store.close()
        return ids

    ids = asyncio.run(refuse_two())
    assert main(["outbox", "list", "--failed"]) == 0
    listed = capsys.readouterr().out
    assert f"{ids[0]}  failed  console:c0" in listed and f"{ids[1]}  failed  console:c1" in listed
    assert "[403/50007]: Cannot send messages to this user" in listed and not any(
        line.startswith(f"{ids[2]}  ") for line in listed.splitlines()
    )
    assert main(["outbox", "list"]) == 0
    assert f"{ids[2]}  pending  console:c2" in capsys.readouterr().out

    assert main(["outbox", "retry", str(ids[0]), str(ids[2])]) == 1  # the pending one is left alone
    out = capsys.readouterr().out
    assert f"requeued 1 reply: {ids[0]}" in out and f"left alone: {ids[2]}" in out
    assert main(["outbox", "retry", "--all"]) == 0
    assert f"requeued 1 reply: {ids[1]}" in capsys.readouterr().out
    assert main(["outbox", "list", "--failed"]) == 0
    assert capsys.readouterr().out.strip() == "no failed replies"

    async def deliver_now() -> list[OutboxDelivery]:
        store = Store(url)
        platform = SlowPlatform()
        assert await OutboxPump(store, platform).flush() == 3  # type: ignore[arg-type]
        async with store.transaction() as session:
            rows = list((await session.execute(select(OutboxDelivery))).scalars())
        await store.close()
        return rows

    rows = asyncio.run(deliver_now())
    assert all(r.status == "delivered" and r.error_code is None for r in rows)
    assert all(r.retry_until is not None for r in rows if r.id != ids[2])  # a fresh deadline
