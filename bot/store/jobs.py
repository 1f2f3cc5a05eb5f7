"""The reply-job queue: enqueue, claim with a lease, complete exactly once, retry with backoff.

Claiming is one `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`: on PostgreSQL
many workers claim disjoint batches; on SQLite the statement runs under its single writer lock.
The lease mechanics are `bot.store.leases` (shared with the outbox). Completing a job checks the lease
(owner and attempt number) in the same transaction that writes the reply and its outbox row, so a job
whose lease expired and was claimed again is answered by exactly one worker. A worker renews the leases
of a batch while it runs (`bot.store.leases.keep_leases`); a job vetoed by its persona's plugin is
closed without a reply (`complete_without_reply`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    Executable,
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    null,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.backoff import backoff
from bot.events import utcnow
from bot.store.conversations import _dialect_insert, storable_text
from bot.store.engine import dialect_of
from bot.store.leases import Lease, LeasedQueue
from bot.store.models import JobStatus, Message, OutboxDelivery, OutboxStatus, ReplyJob, table_of
from bot.store.outbox import topic as outbox_topic
from bot.store.wakeups import notify_sql, wake

QUEUE = LeasedQueue(ReplyJob, waiting=JobStatus.PENDING, leased=JobStatus.RUNNING)
JOBS = "jobs"  # the wake-up topic of workers
# Hot paths use the Core tables and statements built once (see `bot.store.conversations`).
_jobs, _messages, _outbox = table_of(ReplyJob), table_of(Message), table_of(OutboxDelivery)


async def _settled(session: AsyncSession) -> None:
    """A job left the running state: the next job of its channel may be claimable now."""
    await wake(session, JOBS)


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
    options: dict[str, Any] | None = None  # an API request's sampling (`bot.generation.options`)

    @property
    def lease(self) -> Lease:
        return Lease(self.id, self.lease_owner, self.attempts)


@functools.cache
def _enqueue_sql(dialect: str) -> Executable:
    returning: tuple[Any, ...] = (_jobs.c.id,)
    if dialect == "postgresql":  # a queued job wakes the workers with its own statement
        returning += (notify_sql(bindparam("notify_jobs")),)
    return (
        _dialect_insert(dialect)(_jobs)
        .on_conflict_do_nothing(index_elements=["dedupe_key"])
        .returning(*returning)
    )


async def enqueue(
    session: AsyncSession,
    *,
    channel_id: int,
    persona: str,
    dedupe_key: str,
    trigger_message_id: int | None = None,
    kind: str = "reply",
    prompt: str | None = None,
    options: dict[str, Any] | None = None,
) -> int | None:
    """Queue a reply job; returns its id, or None when a job with this key already exists."""
    now = utcnow()
    job_id = (
        await session.execute(
            _enqueue_sql(dialect_of(session)),
            {
                "dedupe_key": dedupe_key,
                "channel_id": channel_id,
                "trigger_message_id": trigger_message_id,
                "persona": persona,
                "kind": kind,
                "prompt": prompt,
                "options": options,
                "status": JobStatus.PENDING,
                "attempts": 0,
                "available_at": now,
                "created_at": now,
                **_NOTIFY_JOBS,
            },
        )
    ).scalar_one_or_none()
    if job_id is not None:
        await wake(session, JOBS, notified=dialect_of(session) == "postgresql")
    return job_id


_NOTIFY_JOBS = {"notify_jobs": JOBS}


_earlier = _jobs.alias("earlier")


_CLAIMABLE = (
    _jobs.c.attempts < bindparam("q_max_attempts"),
    # One reply at a time per channel, in order: a later job waits until the earlier one's reply is
    # written, so it sees that reply in its history and is posted after it.
    ~exists().where(
        _earlier.c.channel_id == _jobs.c.channel_id,
        _earlier.c.id < _jobs.c.id,
        _earlier.c.status.in_((JobStatus.PENDING, JobStatus.RUNNING)),
    ),
)


_CLAIM_RETURNS = (
    _jobs.c.channel_id,
    _jobs.c.persona,
    _jobs.c.kind,
    _jobs.c.prompt,
    _jobs.c.trigger_message_id,
    _jobs.c.created_at,
    _jobs.c.options,
)


async def claim(
    session: AsyncSession,
    *,
    owner: str,
    limit: int,
    lease_seconds: float,
    max_attempts: int,
    fail_exhausted: bool = True,
) -> list[ClaimedJob]:
    """Lease up to `limit` jobs that are pending and due, or whose previous lease expired.

    With `fail_exhausted`, jobs whose worker died on their last attempt are failed first (a worker
    does that once per poll, not on every claim: they are only found by time)."""
    if fail_exhausted:
        await _fail_exhausted(session, utcnow(), max_attempts)
    claimed = await QUEUE.claim(
        session,
        shape="reply jobs",
        owner=owner,
        limit=limit,
        lease_seconds=lease_seconds,
        where=_CLAIMABLE,
        order_by=(_jobs.c.available_at,),
        values={"started_at": utcnow()},
        returning=_CLAIM_RETURNS,
        params={"q_max_attempts": max_attempts},
    )
    return [
        ClaimedJob(
            id=lease.id,
            channel_id=channel_id,
            persona=persona,
            kind=kind,
            prompt=prompt,
            trigger_message_id=trigger,
            attempts=lease.attempt,
            created_at=created_at,
            lease_owner=owner,
            options=options,
        )
        for lease, (channel_id, persona, kind, prompt, trigger, created_at, options) in claimed
    ]


async def _fail_exhausted(session: AsyncSession, now: datetime, max_attempts: int) -> None:
    """A job whose worker died on its last attempt is failed rather than claimed forever."""
    await session.execute(
        update(ReplyJob)
        .where(
            ReplyJob.status == JobStatus.RUNNING,
            ReplyJob.lease_expires_at < now,
            ReplyJob.attempts >= max_attempts,
        )
        .values(
            status=JobStatus.FAILED,
            error="lease expired on the last attempt",
            finished_at=now,
            lease_owner=None,
        )
    )


async def extend_leases(
    session: AsyncSession, claimed: list[ClaimedJob], *, lease_seconds: float
) -> set[int]:
    """Push the leases of jobs still being generated; returns the ids this worker still holds."""
    return await QUEUE.renew(session, [job.lease for job in claimed], lease_seconds=lease_seconds)


async def depth(session: AsyncSession) -> int:
    """Jobs waiting to be claimed now: pending and due, or running under an expired lease."""
    return await QUEUE.depth(session)


@dataclass(frozen=True)
class JobState:
    status: JobStatus
    error: str | None


async def state(session: AsyncSession, job_id: int) -> JobState | None:
    """A job's status and last error; None when there is no such job."""
    row = (
        await session.execute(select(ReplyJob.status, ReplyJob.error).where(ReplyJob.id == job_id))
    ).first()
    return None if row is None else JobState(JobStatus(row.status), row.error)


async def unanswered(session: AsyncSession, channel_id: int) -> int:
    """A channel's reply jobs not yet finished plus its replies not yet delivered (0: all answered)."""
    jobs_left = await session.execute(
        select(func.count())
        .select_from(ReplyJob)
        .where(ReplyJob.channel_id == channel_id, ReplyJob.status.in_((JobStatus.PENDING, JobStatus.RUNNING)))
    )
    deliveries_left = await session.execute(
        select(func.count())
        .select_from(OutboxDelivery)
        .where(
            OutboxDelivery.channel_id == channel_id,
            OutboxDelivery.status.in_((OutboxStatus.PENDING, OutboxStatus.SENDING)),
        )
    )
    return int(jobs_left.scalar_one()) + int(deliveries_left.scalar_one())


async def status_counts(session: AsyncSession) -> dict[str, int]:
    """How many jobs are in each status."""
    rows = await session.execute(select(ReplyJob.status, func.count()).group_by(ReplyJob.status))
    return {str(status): int(n) for status, n in rows.all()}


async def oldest_pending(session: AsyncSession) -> ReplyJob | None:
    """The job that has waited longest."""
    query = (
        select(ReplyJob)
        .where(ReplyJob.status == JobStatus.PENDING)
        .order_by(ReplyJob.created_at, ReplyJob.id)
        .limit(1)
    )
    return (await session.execute(query)).scalar_one_or_none()


async def failures(session: AsyncSession, limit: int | None = None) -> list[ReplyJob]:
    """Failed jobs, the latest first (all of them when `limit` is None)."""
    query = (
        select(ReplyJob)
        .where(ReplyJob.status == JobStatus.FAILED)
        .order_by(ReplyJob.finished_at.desc(), ReplyJob.id.desc())
        .limit(limit)
    )
    return list((await session.execute(query)).scalars())


async def listing(session: AsyncSession, status: str, *, limit: int = 50) -> list[ReplyJob]:
    """Jobs in one status, the most recently changed first (the web console's queue tables)."""
    changed = func.coalesce(ReplyJob.finished_at, ReplyJob.available_at)
    query = select(ReplyJob).where(ReplyJob.status == status).order_by(changed.desc(), ReplyJob.id.desc())
    return list((await session.execute(query.limit(limit))).scalars())


async def unfinished(session: AsyncSession) -> bool:
    """Whether any job is still pending or running."""
    query = select(ReplyJob.id).where(ReplyJob.status.in_((JobStatus.PENDING, JobStatus.RUNNING))).limit(1)
    return (await session.execute(query)).first() is not None


async def complete_without_reply(session: AsyncSession, job: ClaimedJob, *, note: str) -> bool:
    """Close a job with no reply (its persona's plugin vetoed it): `done`, no `reply_message_id`,
    `error` holding `note`. Returns False when this worker no longer holds the lease."""
    held = await QUEUE.finish(session, job.lease, JobStatus.DONE, finished_at=utcnow(), error=note[:4000])
    if held:
        await _settled(session)
    return held


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
    if dialect_of(session) == "postgresql":
        written = (
            await session.execute(
                _COMPLETE_PG,
                {
                    **QUEUE.held_params(job.lease, {}),
                    "p_channel_id": job.channel_id,
                    "p_persona": persona,
                    "p_text": storable_text(text),
                    "p_now": now,
                    "p_excluded_from_prompts": exclude_from_prompts,
                    "p_error": note[:4000] if note else None,
                    "p_platform": platform,
                    "p_trigger_message_id": job.trigger_message_id,
                    "notify_outbox": outbox_topic(platform),
                    **_NOTIFY_JOBS,
                },
            )
        ).scalar_one_or_none()
        if written is not None:
            await wake(session, outbox_topic(platform), notified=True)
            await wake(session, JOBS, notified=True)
        return written
    message_id: int = (
        await session.execute(
            _insert_reply_sql(dialect_of(session)),
            {
                "channel_id": job.channel_id,
                "role": "assistant",
                "persona": persona,
                "text": storable_text(text),  # a model may emit NUL, which PostgreSQL refuses
                "created_at": now,
                "excluded_from_prompts": exclude_from_prompts,
            },
        )
    ).scalar_one()
    if not await QUEUE.finish(
        session,
        job.lease,
        JobStatus.DONE,
        finished_at=now,
        error=note[:4000] if note else None,
        reply_message_id=message_id,
    ):
        # Another worker holds the job now: take back the message, so this call writes nothing.
        await session.execute(_DELETE_MESSAGE, {"id": message_id})
        return None
    await session.execute(
        _INSERT_DELIVERY,
        {
            "message_id": message_id,
            "channel_id": job.channel_id,
            "platform": platform,
            "trigger_message_id": job.trigger_message_id,
            "status": OutboxStatus.PENDING,
            "attempts": 0,
            "available_at": now,
            "delivered_ids": [],
            "created_at": now,
        },
    )
    await wake(session, outbox_topic(platform))
    await _settled(session)
    return message_id


@functools.cache
def _insert_reply_sql(dialect: str) -> Executable:
    return _dialect_insert(dialect)(_messages).returning(_messages.c.id)


def _complete_pg() -> Executable:
    """PostgreSQL: `complete` as one statement, one round trip instead of three. The job's row is
    locked only while its lease is held (`held`); the reply, the job's settling and the outbox row all
    read from it, so a lost lease writes nothing and the statement returns no row. Its parameters are
    named unlike any column: the UPDATE in `settle` would take one named like its columns as a value
    to SET."""
    c, m, o = _jobs.c, _messages.c, _outbox.c
    now = bindparam("p_now", type_=m.created_at.type)
    held = select(c.id).where(*QUEUE.held_bound()).with_for_update().cte("held")
    channel_id = bindparam("p_channel_id", type_=m.channel_id.type)
    reply = (
        insert(_messages)
        .from_select(
            ["channel_id", "role", "persona", "text", "created_at", "excluded_from_prompts"],
            select(
                channel_id,
                literal("assistant", m.role.type),
                bindparam("p_persona", type_=m.persona.type),
                bindparam("p_text", type_=m.text.type),
                now,
                bindparam("p_excluded_from_prompts", type_=m.excluded_from_prompts.type),
            ).select_from(held),
        )
        .returning(m.id)
        .cte("reply")
    )
    settle = (
        update(_jobs)
        .where(c.id == held.c.id)
        .values(
            status=JobStatus.DONE,
            lease_owner=null(),
            lease_expires_at=null(),
            finished_at=now,
            error=bindparam("p_error", type_=c.error.type),
            reply_message_id=select(reply.c.id).scalar_subquery(),
        )
        .cte("settle")
    )
    columns = ["message_id", "channel_id", "platform", "reply_to", "status", "attempts"]
    return (
        insert(_outbox)
        .from_select(
            [*columns, "available_at", "delivered_ids", "created_at"],
            select(
                reply.c.id,
                channel_id,
                bindparam("p_platform", type_=o.platform.type),
                select(m.platform_message_id)
                .where(m.id == bindparam("p_trigger_message_id", type_=m.id.type))
                .scalar_subquery(),
                literal(OutboxStatus.PENDING.value, o.status.type),
                literal(0, o.attempts.type),
                now,
                literal([], o.delivered_ids.type),
                now,
            ).select_from(reply),
        )
        .add_cte(settle)
        # The wake-ups travel with the write: the pump of the reply's platform, and the workers (the
        # channel's next job may be claimable now).
        .returning(o.message_id, notify_sql(bindparam("notify_outbox")), notify_sql(bindparam("notify_jobs")))
    )


_COMPLETE_PG = _complete_pg()
_DELETE_MESSAGE = delete(_messages).where(_messages.c.id == bindparam("id"))
# The reply answers the trigger's platform message (NULL for a scheduled post).
_INSERT_DELIVERY = insert(_outbox).values(
    reply_to=select(_messages.c.platform_message_id)
    .where(_messages.c.id == bindparam("trigger_message_id"))
    .scalar_subquery()
)


async def fail(
    session: AsyncSession,
    job: ClaimedJob,
    *,
    error: str,
    max_attempts: int,
    backoff_seconds: float,
    retryable: bool = True,
) -> JobStatus | Literal["lost"]:
    """Record a failed attempt: back to pending after a backoff, or failed for good.

    Returns the new status, or "lost" when this worker no longer holds the lease (nothing changed).
    """
    error = error[:4000]
    if retryable and job.attempts < max_attempts:
        delay = backoff(job.attempts, base=backoff_seconds)
        held = await QUEUE.retry(session, job.lease, after=delay, error=error)
        if held and delay <= 0:
            await _settled(session)
        return JobStatus.PENDING if held else "lost"
    held = await QUEUE.finish(session, job.lease, JobStatus.FAILED, error=error, finished_at=utcnow())
    if held:
        await _settled(session)
    return JobStatus.FAILED if held else "lost"


async def release(session: AsyncSession, job: ClaimedJob) -> bool:
    """Give an unfinished job back to the queue at once (shutdown); the attempt is not counted.

    Returns False when this worker no longer held the lease.
    """
    held = await QUEUE.release(session, job.lease)
    if held:
        await _settled(session)
    return held


async def release_owner(session: AsyncSession, owner: str) -> int:
    """Give back every job `owner` still holds (a worker that was cut off at shutdown)."""
    released = await QUEUE.release_owner(session, owner)
    if released:
        await _settled(session)
    return released
