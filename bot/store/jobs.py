"""The reply-job queue: enqueue, claim with a lease, complete exactly once, retry with backoff.

Claiming is one `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`: on PostgreSQL
many workers claim disjoint batches; on SQLite the statement runs under its single writer lock.
Completing a job checks the lease (owner and attempt number) in the same transaction that writes the
reply and its outbox row, so a job whose lease expired and was claimed again is answered by exactly one
worker. A worker renews the leases of a long batch (`extend_leases`); a job vetoed by its persona's
plugin is closed without a reply (`complete_without_reply`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from bot.events import utcnow
from bot.store.conversations import _insert_for
from bot.store.models import Channel, Message, OutboxDelivery, ReplyJob


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    channel_id: int
    persona: str
    kind: str
    prompt: str | None
    trigger_message_id: int | None
    attempts: int
    created_at: datetime
    lease_owner: str


async def enqueue(
    session: AsyncSession,
    *,
    channel_id: int,
    persona: str,
    dedupe_key: str,
    trigger_message_id: int | None = None,
    kind: str = "reply",
    prompt: str | None = None,
) -> int | None:
    """Queue a reply job; returns its id, or None when a job with this key already exists."""
    insert = _insert_for(session)
    now = utcnow()
    return (
        await session.execute(
            insert(ReplyJob)
            .values(
                dedupe_key=dedupe_key,
                channel_id=channel_id,
                trigger_message_id=trigger_message_id,
                persona=persona,
                kind=kind,
                prompt=prompt,
                status="pending",
                attempts=0,
                available_at=now,
                created_at=now,
            )
            .on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(ReplyJob.id)
        )
    ).scalar_one_or_none()


_earlier = aliased(ReplyJob)


async def claim(
    session: AsyncSession, *, owner: str, limit: int, lease_seconds: float, max_attempts: int
) -> list[ClaimedJob]:
    """Lease up to `limit` jobs that are pending and due, or whose previous lease expired."""
    now = utcnow()
    await _fail_exhausted(session, now, max_attempts)
    claimable = (
        select(ReplyJob.id)
        .where(
            or_(
                and_(ReplyJob.status == "pending", ReplyJob.available_at <= now),
                and_(ReplyJob.status == "running", ReplyJob.lease_expires_at < now),
            ),
            ReplyJob.attempts < max_attempts,
            # One reply at a time per channel, in order: a later job waits until the earlier one's
            # reply is written, so it sees that reply in its history and is posted after it.
            ~exists().where(
                _earlier.channel_id == ReplyJob.channel_id,
                _earlier.id < ReplyJob.id,
                _earlier.status.in_(("pending", "running")),
            ),
        )
        .order_by(ReplyJob.available_at, ReplyJob.id)
        .limit(limit)
    )
    if session.bind.dialect.name == "postgresql":
        claimable = claimable.with_for_update(skip_locked=True)
    rows = await session.execute(
        update(ReplyJob)
        .where(ReplyJob.id.in_(claimable.scalar_subquery()))
        .values(
            status="running",
            attempts=ReplyJob.attempts + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
        )
        .returning(
            ReplyJob.id,
            ReplyJob.channel_id,
            ReplyJob.persona,
            ReplyJob.kind,
            ReplyJob.prompt,
            ReplyJob.trigger_message_id,
            ReplyJob.attempts,
            ReplyJob.created_at,
        )
    )
    jobs = [ClaimedJob(*row, lease_owner=owner) for row in rows]
    return sorted(jobs, key=lambda j: j.id)


async def _fail_exhausted(session: AsyncSession, now: datetime, max_attempts: int) -> None:
    """A job whose worker died on its last attempt is failed rather than claimed forever."""
    await session.execute(
        update(ReplyJob)
        .where(
            ReplyJob.status == "running",
            ReplyJob.lease_expires_at < now,
            ReplyJob.attempts >= max_attempts,
        )
        .values(status="failed", error="lease expired on the last attempt", finished_at=now, lease_owner=None)
    )


def _held(job: ClaimedJob) -> tuple[object, ...]:
    """The job is still running under this very claim (not a later one, even by the same worker)."""
    return (
        ReplyJob.id == job.id,
        ReplyJob.status == "running",
        ReplyJob.lease_owner == job.lease_owner,
        ReplyJob.attempts == job.attempts,
    )


async def extend_leases(
    session: AsyncSession, claimed: list[ClaimedJob], *, lease_seconds: float
) -> set[int]:
    """Push the leases of jobs still being generated; returns the ids this worker still holds."""
    held: set[int] = set()
    until = utcnow() + timedelta(seconds=lease_seconds)
    for job in claimed:
        result = await session.execute(update(ReplyJob).where(*_held(job)).values(lease_expires_at=until))
        if result.rowcount == 1:
            held.add(job.id)
    return held


async def depth(session: AsyncSession) -> int:
    """Jobs waiting to be claimed now: pending and due, or running under an expired lease."""
    now = utcnow()
    return int(
        (
            await session.execute(
                select(func.count(ReplyJob.id)).where(
                    or_(
                        and_(ReplyJob.status == "pending", ReplyJob.available_at <= now),
                        and_(ReplyJob.status == "running", ReplyJob.lease_expires_at < now),
                    )
                )
            )
        ).scalar_one()
    )


async def complete_without_reply(session: AsyncSession, job: ClaimedJob, *, note: str) -> bool:
    """Close a job with no reply (its persona's plugin vetoed it): `done`, no `reply_message_id`,
    `error` holding `note`. Returns False when this worker no longer holds the lease."""
    won = await session.execute(
        update(ReplyJob)
        .where(*_held(job))
        .values(status="done", finished_at=utcnow(), lease_expires_at=None, error=note[:4000])
    )
    return won.rowcount == 1


async def complete(
    session: AsyncSession,
    job: ClaimedJob,
    *,
    text: str,
    persona: str,
    platform: str,
    note: str | None = None,
    exclude_from_prompts: bool = False,
) -> int | None:
    """Write the reply and its outbox row and close the job, all in the caller's transaction.

    `note` (what the loop guard or the reply cleanup did) is kept in the job's `error` column; with
    `exclude_from_prompts` the reply is delivered but later prompts leave it out.

    Returns the assistant message id, or None when this worker no longer holds the job's lease
    (another worker answered it); the caller then rolls back and nothing is written.
    """
    now = utcnow()
    won = await session.execute(
        update(ReplyJob)
        .where(*_held(job))
        .values(status="done", finished_at=now, lease_expires_at=None, error=note[:4000] if note else None)
    )
    if won.rowcount != 1:
        return None
    reply_to = None
    if job.trigger_message_id is not None:
        reply_to = (
            await session.execute(
                select(Message.platform_message_id).where(Message.id == job.trigger_message_id)
            )
        ).scalar_one_or_none()
    message_id = (
        await session.execute(
            _insert_for(session)(Message)
            .values(
                channel_id=job.channel_id,
                role="assistant",
                persona=persona,
                text=text,
                created_at=now,
                excluded_from_prompts=exclude_from_prompts,
            )
            .returning(Message.id)
        )
    ).scalar_one()
    await session.execute(
        _insert_for(session)(OutboxDelivery).values(
            message_id=message_id,
            channel_id=job.channel_id,
            platform=platform,
            reply_to=reply_to,
            status="pending",
            attempts=0,
            available_at=now,
            delivered_ids=[],
            created_at=now,
        )
    )
    await session.execute(update(ReplyJob).where(ReplyJob.id == job.id).values(reply_message_id=message_id))
    await session.execute(update(Channel).where(Channel.id == job.channel_id).values(last_message_at=now))
    return message_id


async def fail(
    session: AsyncSession,
    job: ClaimedJob,
    *,
    error: str,
    max_attempts: int,
    backoff_seconds: float,
    retryable: bool = True,
) -> str:
    """Record a failed attempt: back to pending after a backoff, or failed for good.

    Returns the new status, or "lost" when this worker no longer holds the lease (nothing changed).
    """
    now = utcnow()
    final = not retryable or job.attempts >= max_attempts
    status = "failed" if final else "pending"
    delay = backoff_seconds * (2 ** max(job.attempts - 1, 0))
    result = await session.execute(
        update(ReplyJob)
        .where(*_held(job))
        .values(
            status=status,
            error=error[:4000],
            lease_owner=None,
            lease_expires_at=None,
            available_at=now + timedelta(seconds=delay),
            finished_at=now if final else None,
        )
    )
    return status if result.rowcount == 1 else "lost"


async def release(session: AsyncSession, job: ClaimedJob) -> bool:
    """Give an unfinished job back to the queue at once (shutdown); the attempt is not counted.

    Returns False when this worker no longer held the lease.
    """
    result = await session.execute(
        update(ReplyJob)
        .where(*_held(job))
        .values(
            status="pending",
            attempts=ReplyJob.attempts - 1,
            lease_owner=None,
            lease_expires_at=None,
            available_at=utcnow(),
        )
    )
    return result.rowcount == 1
