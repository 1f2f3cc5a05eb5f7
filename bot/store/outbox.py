"""The outbox: replies waiting to be posted, claimed by the adapter of their platform with a lease."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import ChannelKind, ChannelRef, Outgoing, utcnow
from bot.store.models import Channel, Message, OutboxDelivery, ReplyJob


async def claim(
    session: AsyncSession, *, platform: str, owner: str, limit: int, lease_seconds: float
) -> list[Outgoing]:
    """Lease up to `limit` undelivered replies of `platform`, oldest first."""
    now = utcnow()
    claimable = (
        select(OutboxDelivery.id)
        .where(
            OutboxDelivery.platform == platform,
            or_(
                and_(OutboxDelivery.status == "pending", OutboxDelivery.available_at <= now),
                and_(OutboxDelivery.status == "sending", OutboxDelivery.lease_expires_at < now),
            ),
        )
        .order_by(OutboxDelivery.id)
        .limit(limit)
    )
    if session.bind.dialect.name == "postgresql":
        claimable = claimable.with_for_update(skip_locked=True)
    ids = (
        (
            await session.execute(
                update(OutboxDelivery)
                .where(OutboxDelivery.id.in_(claimable.scalar_subquery()))
                .values(
                    status="sending",
                    attempts=OutboxDelivery.attempts + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                )
                .returning(OutboxDelivery.id)
            )
        )
        .scalars()
        .all()
    )
    if not ids:
        return []
    rows = await session.execute(
        select(OutboxDelivery, Message.text, Message.persona, Channel, ReplyJob.id)
        .join(Message, Message.id == OutboxDelivery.message_id)
        .join(Channel, Channel.id == OutboxDelivery.channel_id)
        .outerjoin(ReplyJob, ReplyJob.reply_message_id == OutboxDelivery.message_id)
        .where(OutboxDelivery.id.in_(ids))
        .order_by(OutboxDelivery.id)
    )
    return [
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
        )
        for delivery, text, persona, channel, job_id in rows
    ]


async def record_progress(session: AsyncSession, outbox_id: int, delivered_ids: list[str]) -> None:
    """Remember the chunks posted so far, so a retry resumes after them."""
    await session.execute(
        update(OutboxDelivery).where(OutboxDelivery.id == outbox_id).values(delivered_ids=list(delivered_ids))
    )


async def mark_delivered(session: AsyncSession, outbox_id: int, platform_ids: list[str]) -> None:
    """Record the platform's ids of the posted chunks; the first also becomes the message's id."""
    now = utcnow()
    await session.execute(
        update(OutboxDelivery)
        .where(OutboxDelivery.id == outbox_id)
        .values(
            status="delivered",
            delivered_ids=list(platform_ids),
            delivered_at=now,
            lease_owner=None,
            lease_expires_at=None,
            error=None,
        )
    )
    if platform_ids:
        message_id = (
            await session.execute(select(OutboxDelivery.message_id).where(OutboxDelivery.id == outbox_id))
        ).scalar_one()
        await session.execute(
            update(Message).where(Message.id == message_id).values(platform_message_id=platform_ids[0])
        )


async def mark_failed(
    session: AsyncSession, outbox_id: int, *, error: str, max_attempts: int, backoff_seconds: float
) -> str:
    """A failed delivery is retried with backoff, then given up; returns the new status."""
    now = utcnow()
    attempts = (
        await session.execute(select(OutboxDelivery.attempts).where(OutboxDelivery.id == outbox_id))
    ).scalar_one()
    final = attempts >= max_attempts
    await session.execute(
        update(OutboxDelivery)
        .where(OutboxDelivery.id == outbox_id)
        .values(
            status="failed" if final else "pending",
            error=error[:4000],
            lease_owner=None,
            lease_expires_at=None,
            available_at=now + timedelta(seconds=backoff_seconds * (2 ** max(attempts - 1, 0))),
        )
    )
    return "failed" if final else "pending"
