"""A generated reply is stored whatever characters the model produced: a tiny model's NUL made
PostgreSQL refuse the insert ("invalid byte sequence for encoding UTF8: 0x00") on every retry, so
the message was never answered (found by the chaos run)."""

from __future__ import annotations

from sqlalchemy import select

from bot.store import Store, jobs
from bot.store.models import Message, OutboxDelivery
from tests.test_jobs import add_jobs, claim


async def test_a_reply_with_nul_and_lone_surrogates_is_stored_and_queued(store: Store) -> None:
    await add_jobs(store, 1)
    (job,) = await claim(store, "w1")
    async with store.transaction() as session:
        message_id = await jobs.complete(
            session, job, text="a\x00b \ud800c", persona="assistant", platform="console"
        )
    assert message_id is not None
    async with store.transaction() as session:
        reply = (await session.execute(select(Message).where(Message.id == message_id))).scalar_one()
        queued = (await session.execute(select(OutboxDelivery))).scalar_one()
    assert reply.text == "ab \ufffdc" and queued.message_id == message_id
