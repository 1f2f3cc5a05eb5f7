"""The outbox: replies waiting to be posted, claimed by the adapter of their platform with a lease.

The lease mechanics are `bot.store.leases` (shared with the reply jobs): progress, delivery and failure
are written only while the caller still holds the row's lease, so a pump whose lease ran out (and whose
row another pump claimed) never overwrites the newer holder's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.backoff import backoff
from bot.events import ChannelKind, ChannelRef, Outgoing, utcnow
from bot.store.leases import Lease, LeasedQueue
from bot.store.models import Channel, Message, OutboxDelivery, OutboxStatus, ReplyJob

QUEUE = LeasedQueue(OutboxDelivery, waiting=OutboxStatus.PENDING, leased=OutboxStatus.SENDING)


@dataclass(frozen=True)
class ClaimedDelivery:
    """An outbox row leased for delivery: the reply to post and the lease every later write checks."""

    lease: Lease
    reply: Outgoing


async def claim(
    session: AsyncSession, *, platform: str, owner: str, limit: int, lease_seconds: float
) -> list[ClaimedDelivery]:
    """Lease up to `limit` undelivered replies of `platform`, oldest first."""
    claimed = await QUEUE.claim(
        session,
        owner=owner,
        limit=limit,
        lease_seconds=lease_seconds,
        where=(OutboxDelivery.platform == platform,),
    )
    if not claimed:
        return []
    leases = {lease.id: lease for lease, _ in claimed}
    rows = await session.execute(
        select(OutboxDelivery, Message.text, Message.persona, Channel, ReplyJob.id)
        .join(Message, Message.id == OutboxDelivery.message_id)
        .join(Channel, Channel.id == OutboxDelivery.channel_id)
        .outerjoin(ReplyJob, ReplyJob.reply_message_id == OutboxDelivery.message_id)
        .where(OutboxDelivery.id.in_(leases))
        .order_by(OutboxDelivery.id)
    )
    return [
        ClaimedDelivery(
            leases[delivery.id],
            Outgoing(
                outbox_id=delivery.id,
                channel=ChannelRef(
                    platform=channel.platform,
                    external_id=channel.external_id,
                    kind=ChannelKind(channel.kind),
                    thread_id=channel.thread_id,
                    title=channel.title,
                ),
                text=text,
                persona=persona,
                reply_to=delivery.reply_to,
                delivered_ids=tuple(delivery.delivered_ids or ()),
                job_id=job_id,
            ),
        )
        for delivery, text, persona, channel, job_id in rows
    ]


async def record_progress(session: AsyncSession, lease: Lease, delivered_ids: list[str]) -> bool:
    """Remember the chunks posted so far, so a retry resumes after them; False once the lease is lost."""
    return await QUEUE.update_held(session, lease, delivered_ids=list(delivered_ids))


async def mark_delivered(session: AsyncSession, lease: Lease, platform_ids: list[str]) -> bool:
    """Record the platform's ids of the posted chunks; the first also becomes the message's id.

    Returns False (and writes nothing) when the caller no longer holds the lease.
    """
    done = await QUEUE.finish(
        session,
        lease,
        OutboxStatus.DELIVERED,
        delivered_ids=list(platform_ids),
        delivered_at=utcnow(),
        error=None,
    )
    if done and platform_ids:
        message_id = (
            await session.execute(select(OutboxDelivery.message_id).where(OutboxDelivery.id == lease.id))
        ).scalar_one()
        await session.execute(
            update(Message).where(Message.id == message_id).values(platform_message_id=platform_ids[0])
        )
    return done


async def mark_failed(
    session: AsyncSession, lease: Lease, *, error: str, max_attempts: int, backoff_seconds: float
) -> str:
    """A failed delivery is retried with backoff, then given up; returns the new status, or "lost"
    when the caller no longer holds the lease (nothing changed)."""
    error = error[:4000]
    if lease.attempt < max_attempts:
        held = await QUEUE.retry(
            session, lease, after=backoff(lease.attempt, base=backoff_seconds), error=error
        )
        return OutboxStatus.PENDING if held else "lost"
    held = await QUEUE.finish(session, lease, OutboxStatus.FAILED, error=error)
    return OutboxStatus.FAILED if held else "lost"
