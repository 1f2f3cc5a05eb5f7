"""The outbox: replies waiting to be posted, claimed by the adapter of their platform with a lease.

The lease mechanics are `bot.store.leases` (shared with the reply jobs): progress, delivery and failure
are written only while the caller still holds the row's lease, so a pump whose lease ran out (and whose
row another pump claimed) never overwrites the newer holder's state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Executable, Row, Select, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.backoff import backoff
from bot.events import ChannelKind, ChannelRef, Outgoing, utcnow
from bot.store.conversations import channel_ref
from bot.store.engine import dialect_of, rowcount
from bot.store.leases import Lease, LeasedQueue
from bot.store.models import Channel, Message, OutboxDelivery, OutboxStatus, ReplyJob, table_of
from bot.store.wakeups import wake

QUEUE = LeasedQueue(OutboxDelivery, waiting=OutboxStatus.PENDING, leased=OutboxStatus.SENDING)


def topic(platform: str) -> str:
    """The wake-up topic of a platform's outbox pump."""
    return f"outbox:{platform}"


@dataclass(frozen=True)
class ClaimedDelivery:
    """An outbox row leased for delivery: the reply to post and the lease every later write checks."""

    lease: Lease
    reply: Outgoing
    # The chunk whose send was started by an earlier holder that never recorded its answer.
    inflight: int | None = None


async def claim(
    session: AsyncSession, *, platform: str, owner: str, limit: int, lease_seconds: float
) -> list[ClaimedDelivery]:
    """Lease up to `limit` undelivered replies of `platform`, oldest first. One statement on
    PostgreSQL (`Store.single_statement` runs it without BEGIN and COMMIT), two on SQLite."""
    if dialect_of(session) == "postgresql":
        params = QUEUE.claim_params(owner, limit, lease_seconds, {}, {"q_platform": platform})
        rows = await session.execute(_claim_and_read_pg(), params)
        return [
            ClaimedDelivery(Lease(row.id, owner, row.attempts), _outgoing(row), row.inflight_chunk)
            for row in rows
        ]
    claimed = await QUEUE.claim(
        session,
        shape=_SHAPE,
        owner=owner,
        limit=limit,
        lease_seconds=lease_seconds,
        where=_CLAIMABLE,
        params={"q_platform": platform},
    )
    if not claimed:
        return []
    leases = {lease.id: lease for lease, _ in claimed}
    rows = await session.execute(_CLAIMED, {"ids": list(leases)})
    return [ClaimedDelivery(leases[row.id], _outgoing(row), row.inflight_chunk) for row in rows]


def _outgoing(row: Row[Any]) -> Outgoing:
    return Outgoing(
        outbox_id=row.id,
        channel=ChannelRef(
            platform=row.platform,
            external_id=row.external_id,
            kind=ChannelKind(row.kind),
            thread_id=row.thread_id,
            title=row.title,
        ),
        text=row.text,
        persona=row.persona,
        reply_to=row.reply_to,
        delivered_ids=tuple(row.delivered_ids or ()),
        job_id=row.job_id,
        streamed_id=row.streamed_id,
    )


_outbox, _messages, _channels, _jobs = (
    table_of(OutboxDelivery),
    table_of(Message),
    table_of(Channel),
    table_of(ReplyJob),
)
_SHAPE = "outbox of a platform"
_CLAIMABLE = (_outbox.c.platform == bindparam("q_platform"),)


def _claimed_rows(*columns: Any) -> Select[Any]:
    """What a claimed delivery needs to be posted: plain columns (no ORM objects), one row each."""
    return (
        select(
            _outbox.c.id,
            _outbox.c.reply_to,
            _outbox.c.delivered_ids,
            _outbox.c.inflight_chunk,
            _messages.c.text,
            _messages.c.persona,
            _channels.c.platform,
            _channels.c.external_id,
            _channels.c.kind,
            _channels.c.thread_id,
            _channels.c.title,
            _jobs.c.id.label("job_id"),
            _jobs.c.streamed_id,
            *columns,
        )
        .select_from(
            _outbox.join(_messages, _messages.c.id == _outbox.c.message_id)
            .join(_channels, _channels.c.id == _outbox.c.channel_id)
            .outerjoin(_jobs, _jobs.c.reply_message_id == _outbox.c.message_id)
        )
        .order_by(_outbox.c.id)
    )


_CLAIMED = _claimed_rows().where(_outbox.c.id.in_(bindparam("ids", expanding=True)))


@functools.cache
def _claim_and_read_pg() -> Executable:
    """PostgreSQL: the claim and the read of what the claimed rows need, one statement (`WITH claimed
    AS (UPDATE ... RETURNING id, attempts) SELECT ... JOIN claimed`). The columns read are ones the
    claim does not change, so the statement's snapshot (from before the claim) is right for them."""
    claimed = QUEUE.claim_sql("postgresql", _SHAPE, _CLAIMABLE).cte("claimed")
    return _claimed_rows(claimed.c.attempts).join(claimed, claimed.c.id == _outbox.c.id)


async def record_progress(
    session: AsyncSession, lease: Lease, delivered_ids: list[str], *, inflight: int | None = None
) -> bool:
    """Remember the chunks posted so far, so a retry resumes after them, and the chunk being sent now
    (`inflight`); False once the lease is lost."""
    return await QUEUE.update_held(session, lease, delivered_ids=list(delivered_ids), inflight_chunk=inflight)


async def mark_delivered(session: AsyncSession, lease: Lease, platform_ids: list[str]) -> bool:
    """Record the platform's ids of the posted chunks; the first also becomes the message's id.

    Returns False (and writes nothing) when the caller no longer holds the lease.
    """
    values = {
        "status": OutboxStatus.DELIVERED,
        "lease_owner": None,
        "lease_expires_at": None,
        "delivered_ids": list(platform_ids),
        "delivered_at": utcnow(),
        "error": None,
        "inflight_chunk": None,
    }
    if platform_ids and dialect_of(session) == "postgresql":
        # One statement (one round trip) settles the row and names the message.
        params = {**QUEUE.held_params(lease, values), "first_id": platform_ids[0]}
        return rowcount(await session.execute(_deliver_and_name_sql(tuple(sorted(values))), params)) == 1
    done = await QUEUE.update_held(session, lease, **values)
    if done and platform_ids:
        await session.execute(_NAME_REPLY, {"outbox_id": lease.id, "first_id": platform_ids[0]})
    return done


# The posted reply's message takes the platform's id of its first chunk.
_NAME_REPLY = (
    update(_messages)
    .where(
        _messages.c.id
        == select(_outbox.c.message_id).where(_outbox.c.id == bindparam("outbox_id")).scalar_subquery()
    )
    .values(platform_message_id=bindparam("first_id"))
)


@functools.cache
def _deliver_and_name_sql(columns: tuple[str, ...]) -> Executable:
    """PostgreSQL: `WITH done AS (UPDATE outbox ... WHERE <held> RETURNING message_id) UPDATE messages
    ... FROM done`: the message is named only when the row was still held (rowcount 1)."""
    done = QUEUE.held_update(columns).returning(_outbox.c.message_id).cte("done")
    return (
        update(_messages)
        .where(_messages.c.id == done.c.message_id)
        .values(platform_message_id=bindparam("first_id"))
    )


async def mark_refused(session: AsyncSession, lease: Lease, *, code: str, reason: str) -> bool:
    """The platform refused the reply for good: failed now, with its code and words kept."""
    return await QUEUE.finish(
        session,
        lease,
        OutboxStatus.FAILED,
        error=reason[:4000] or code,
        error_code=code[:64],
        inflight_chunk=None,
    )


async def mark_unknown(session: AsyncSession, lease: Lease, *, error: str) -> bool:
    """A send may or may not have been posted (its answer never came): not retried blindly."""
    return await QUEUE.finish(session, lease, OutboxStatus.UNKNOWN, error=error[:4000])


async def mark_retry(
    session: AsyncSession,
    lease: Lease,
    *,
    error: str,
    backoff_seconds: float,
    max_backoff_seconds: float,
    deadline: timedelta,
) -> tuple[OutboxStatus | Literal["lost"], float]:
    """A transient failure: retried after a capped, jittered backoff until the row's deadline
    (`retry_until`, else `deadline` after it was written), then failed.

    Returns the new status and the delay before the next attempt; "lost" when the caller no longer
    holds the lease (nothing changed).
    """
    created_at, retry_until = (
        await session.execute(
            select(OutboxDelivery.created_at, OutboxDelivery.retry_until).where(OutboxDelivery.id == lease.id)
        )
    ).one()
    until = retry_until or created_at + deadline
    delay = backoff(lease.attempt, base=backoff_seconds, cap=max_backoff_seconds)
    if utcnow() + timedelta(seconds=delay) > until:
        hours = (until - created_at).total_seconds() / 3600
        held = await QUEUE.finish(
            session,
            lease,
            OutboxStatus.FAILED,
            error=f"still failing after {hours:g} h: {error}"[:4000],
            inflight_chunk=None,
        )
        return (OutboxStatus.FAILED if held else "lost"), 0.0
    # The failed send never reached the platform (else the adapter says `DeliveryUnknown`): no chunk
    # is in flight any more.
    held = await QUEUE.retry(session, lease, after=delay, error=error[:4000], inflight_chunk=None)
    return (OutboxStatus.PENDING if held else "lost"), delay


async def requeue(session: AsyncSession, ids: list[int] | None, *, deadline: timedelta) -> list[int]:
    """Failed or unknown deliveries (`ids`, or all of them) pending again now, with a fresh deadline.

    Returns the ids requeued; a delivered or pending row is left alone.
    """
    now = utcnow()
    where = [OutboxDelivery.status.in_((OutboxStatus.FAILED, OutboxStatus.UNKNOWN))]
    if ids is not None:
        where.append(OutboxDelivery.id.in_(ids))
    result = await session.execute(
        update(OutboxDelivery)
        .where(*where)
        .values(
            status=OutboxStatus.PENDING,
            attempts=0,
            available_at=now,
            retry_until=now + deadline,
            error=None,
            error_code=None,
            inflight_chunk=None,  # the operator checked: send it again
        )
        .returning(OutboxDelivery.id, OutboxDelivery.platform)
    )
    requeued = result.all()
    for platform in {platform for _, platform in requeued}:
        await wake(session, topic(platform))
    return sorted(row_id for row_id, _ in requeued)


@dataclass(frozen=True)
class DeliveryRow:
    """One outbox row as `personabot outbox list` and `personabot status` show it."""

    id: int
    platform: str
    channel: str
    status: str
    attempts: int
    error_code: str | None
    error: str | None
    created_at: datetime
    text: str


async def status_counts(session: AsyncSession) -> dict[str, int]:
    """How many deliveries are in each status, delivered ones left out."""
    rows = await session.execute(
        select(OutboxDelivery.status, func.count())
        .where(OutboxDelivery.status != OutboxStatus.DELIVERED)
        .group_by(OutboxDelivery.status)
    )
    return {str(status): int(n) for status, n in rows.all()}


async def listing(session: AsyncSession, *, failed_only: bool = False, limit: int = 50) -> list[DeliveryRow]:
    """Undelivered replies (or only the failed and unknown ones), newest first."""
    statuses = [OutboxStatus.FAILED, OutboxStatus.UNKNOWN]
    if not failed_only:
        statuses += [OutboxStatus.PENDING, OutboxStatus.SENDING]
    rows = await session.execute(
        select(OutboxDelivery, Channel, Message.text)
        .join(Channel, Channel.id == OutboxDelivery.channel_id)
        .join(Message, Message.id == OutboxDelivery.message_id)
        .where(OutboxDelivery.status.in_(statuses))
        .order_by(OutboxDelivery.id.desc())
        .limit(limit)
    )
    return [
        DeliveryRow(
            id=row.id,
            platform=row.platform,
            channel=channel_ref(channel).key,
            status=row.status,
            attempts=row.attempts,
            error_code=row.error_code,
            error=row.error,
            created_at=row.created_at,
            text=text,
        )
        for row, channel, text in rows
    ]
