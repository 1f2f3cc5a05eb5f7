"""The reply-job queue on SQLite and PostgreSQL: leases, exactly one reply, retries, release."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select, update

from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming, utcnow
from bot.store import Store, conversations, jobs
from bot.store.models import JobStatus, Message, OutboxDelivery, OutboxStatus, ReplyJob


async def add_jobs(
    store: Store, count: int, persona: str = "assistant", channel: str = "c", *, one_channel: bool = False
) -> list[int]:
    """`count` messages with their reply jobs, each in its own channel (or all in one, `one_channel`)."""
    ids = []
    async with store.transaction() as session:
        for n in range(count):
            stored = await conversations.ingest(
                session,
                Incoming(
                    platform="console",
                    channel=ChannelRef(
                        "console", channel if one_channel else f"{channel}{n}", ChannelKind.DIRECT
                    ),
                    author=AuthorRef("console", "ada", "Ada"),
                    text=f"message {n}",
                    platform_message_id=f"m{n}",
                ),
            )
            job = await jobs.enqueue(
                session,
                channel_id=stored.channel_id,
                persona=persona,
                dedupe_key=f"msg:{stored.message_id}:{persona}",
                trigger_message_id=stored.message_id,
            )
            assert job is not None
            ids.append(job)
    return ids


async def claim(
    store: Store, owner: str, limit: int = 10, lease: float = 60, attempts: int = 3
) -> list[jobs.ClaimedJob]:
    async with store.transaction() as session:
        return await jobs.claim(session, owner=owner, limit=limit, lease_seconds=lease, max_attempts=attempts)


async def expire_leases(store: Store) -> None:
    async with store.transaction() as session:
        await session.execute(
            update(ReplyJob)
            .where(ReplyJob.status == "running")
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


async def count(store: Store, model: type, *where: object) -> int:
    async with store.transaction() as session:
        return int(
            (await session.execute(select(func.count()).select_from(model).where(*where))).scalar_one()
        )


async def job_row(store: Store, job_id: int) -> ReplyJob:
    async with store.transaction() as session:
        row = await session.get(ReplyJob, job_id)
        assert row is not None
        return row


async def test_claims_are_batches_and_disjoint(store: Store) -> None:
    ids = await add_jobs(store, 7)
    first = await claim(store, "w1", limit=4)
    second = await claim(store, "w2", limit=4)
    assert [j.id for j in first] == ids[:4]  # oldest first
    assert [j.id for j in second] == ids[4:]
    assert await claim(store, "w3") == []
    async with store.transaction() as session:
        assert await jobs.depth(session) == 0


async def test_enqueue_is_idempotent(store: Store) -> None:
    (job_id,) = await add_jobs(store, 1)
    row = await job_row(store, job_id)
    async with store.transaction() as session:
        again = await jobs.enqueue(
            session, channel_id=row.channel_id, persona="assistant", dedupe_key=row.dedupe_key
        )
    assert again is None
    assert await count(store, ReplyJob) == 1


async def test_expired_lease_is_claimed_again_and_answered_once(store: Store) -> None:
    (job_id,) = await add_jobs(store, 1)
    (old,) = await claim(store, "dead-worker")
    await expire_leases(store)
    (new,) = await claim(store, "live-worker")
    assert new.id == job_id and new.attempts == 2
    async with store.transaction() as session:
        assert await jobs.complete(
            session, new, text="from the live worker", persona="assistant", platform="console"
        )
    async with store.transaction() as session:
        # The first worker wakes up and finishes too: its write is refused, nothing is added.
        assert await jobs.complete(session, old, text="late", persona="assistant", platform="console") is None
    assert await count(store, Message, Message.role == "assistant") == 1
    assert await count(store, OutboxDelivery) == 1
    row = await job_row(store, job_id)
    assert row.status == "done" and row.reply_message_id is not None


async def test_an_older_claim_by_the_same_worker_cannot_complete(store: Store) -> None:
    await add_jobs(store, 1)
    (old,) = await claim(store, "w")
    await expire_leases(store)
    (new,) = await claim(store, "w")  # same owner name (e.g. a restarted process with the same pid)
    async with store.transaction() as session:
        assert (
            await jobs.complete(session, old, text="stale", persona="assistant", platform="console") is None
        )
        assert await jobs.complete(session, new, text="fresh", persona="assistant", platform="console")
    assert await count(store, Message, Message.role == "assistant") == 1


async def test_failures_back_off_then_fail_for_good(store: Store) -> None:
    (job_id,) = await add_jobs(store, 1)
    for attempt in (1, 2):
        (job,) = await claim(store, "w", attempts=3)
        assert job.attempts == attempt
        before = utcnow()
        async with store.transaction() as session:
            assert (
                await jobs.fail(session, job, error="boom", max_attempts=3, backoff_seconds=10) == "pending"
            )
        row = await job_row(store, job_id)
        delay = (row.available_at - before).total_seconds()
        full = 10 * 2 ** (attempt - 1)
        assert full / 2 - 1 < delay <= full + 1  # exponential backoff, jittered in its upper half
        assert await claim(store, "w") == []  # not due yet
        async with store.transaction() as session:
            await session.execute(update(ReplyJob).values(available_at=utcnow()))
    (job,) = await claim(store, "w", attempts=3)
    async with store.transaction() as session:
        assert (
            await jobs.fail(session, job, error="boom again", max_attempts=3, backoff_seconds=10) == "failed"
        )
    row = await job_row(store, job_id)
    assert row.status == "failed" and row.error == "boom again" and row.finished_at is not None


async def test_a_job_whose_worker_died_on_its_last_attempt_fails(store: Store) -> None:
    (job_id,) = await add_jobs(store, 1)
    await claim(store, "w", attempts=1)
    await expire_leases(store)
    assert await claim(store, "w2", attempts=1) == []
    row = await job_row(store, job_id)
    assert row.status == "failed" and row.error == "lease expired on the last attempt"


async def test_release_returns_the_job_without_counting_the_attempt(store: Store) -> None:
    (job_id,) = await add_jobs(store, 1)
    (job,) = await claim(store, "w")
    async with store.transaction() as session:
        assert await jobs.release(session, job)
        assert not await jobs.release(session, job)  # already released: nothing to do
    row = await job_row(store, job_id)
    assert row.status == "pending" and row.attempts == 0 and row.lease_owner is None
    async with store.transaction() as session:
        assert await jobs.depth(session) == 1


async def test_extend_leases_only_for_jobs_still_held(store: Store) -> None:
    await add_jobs(store, 2)
    held = await claim(store, "w", lease=5)
    await expire_leases(store)
    async with store.transaction() as session:
        # Job 2's lease expired and another worker took it over.
        await session.execute(update(ReplyJob).where(ReplyJob.id == held[1].id).values(lease_owner="other"))
        assert await jobs.extend_leases(session, held, lease_seconds=60) == {held[0].id}
    row = await job_row(store, held[0].id)
    assert row.lease_expires_at is not None and row.lease_expires_at > utcnow() + timedelta(seconds=50)


async def test_a_vetoed_job_is_done_without_a_reply(store: Store) -> None:
    (job_id,) = await add_jobs(store, 1)
    (job,) = await claim(store, "w")
    async with store.transaction() as session:
        assert await jobs.complete_without_reply(session, job, note="vetoed by the plugin")
    row = await job_row(store, job_id)
    assert row.status == "done" and row.reply_message_id is None and row.error == "vetoed by the plugin"
    assert await count(store, Message, Message.role == "assistant") == 0
    assert await count(store, OutboxDelivery) == 0


async def test_a_channel_is_unanswered_until_its_reply_is_delivered(store: Store) -> None:
    (job_id,) = await add_jobs(store, 1, channel="u", one_channel=True)
    async with store.transaction() as session:
        channel_id = await conversations.find_channel(session, ChannelRef("console", "u", ChannelKind.DIRECT))
        assert channel_id is not None
        assert await jobs.unanswered(session, channel_id) == 1  # the pending job
        state = await jobs.state(session, job_id)
        assert state == jobs.JobState(JobStatus.PENDING, None)
        assert await jobs.state(session, job_id + 1000) is None
        assert await conversations.channel_by_id(session, channel_id) == ChannelRef(
            "console", "u", ChannelKind.DIRECT
        )
        assert await conversations.channel_by_id(session, channel_id + 1000) is None
    (job,) = await claim(store, "w")
    async with store.transaction() as session:
        await jobs.complete(session, job, text="hi", persona="assistant", platform="console")
        assert (await jobs.state(session, job_id)).status == JobStatus.DONE  # type: ignore[union-attr]
        assert await jobs.unanswered(session, channel_id) == 1  # now the undelivered reply
        await session.execute(update(OutboxDelivery).values(status=OutboxStatus.DELIVERED))
        assert await jobs.unanswered(session, channel_id) == 0


async def test_queue_overview_for_status_and_eval(store: Store) -> None:
    first, second = await add_jobs(store, 2, channel="o")
    async with store.transaction() as session:
        assert await jobs.unfinished(session)
        assert (await jobs.oldest_pending(session)).id == first  # type: ignore[union-attr]
    claimed = await claim(store, "w", attempts=1)
    async with store.transaction() as session:
        for job in claimed:
            await jobs.fail(
                session, job, error=f"boom {job.id}", retryable=False, max_attempts=1, backoff_seconds=0
            )
    async with store.transaction() as session:
        assert not await jobs.unfinished(session)
        assert await jobs.oldest_pending(session) is None
        assert await jobs.status_counts(session) == {"failed": 2}
        assert [j.error for j in await jobs.failures(session, limit=1)] == [f"boom {second}"]  # latest first
        assert {j.id for j in await jobs.failures(session)} == {first, second}
