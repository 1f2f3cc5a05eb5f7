"""Retention: delete messages older than the configured age, globally or per channel.

`scheduler.retention_days` applies to every channel; `scheduler.retention_channels` overrides it for
single chats (`telegram:-100123`: every thread of that chat) or threads (`discord:42/7`). Messages that
work still depends on are kept whatever their age: the trigger of a pending or running reply job, and
a reply still waiting in the outbox. Finished jobs and delivered outbox rows of deleted messages go
with them. Users are kept (their `/optin` choice outlives their messages), as are `/forget` records.
Deletes run in batches, each its own short transaction, so a large prune never holds the store long.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.config import SchedulerSettings
from bot.store import Store
from bot.store.engine import rowcount
from bot.store.models import Channel, JobStatus, Message, OutboxDelivery, OutboxStatus, ReplyJob

log = logging.getLogger(__name__)

BATCH = 2000


def _parse_key(key: str) -> tuple[str, str, str | None]:
    platform, _, rest = key.partition(":")
    external_id, _, thread = rest.partition("/")
    return platform, external_id, thread or None


async def channel_cutoffs(
    session: AsyncSession, settings: SchedulerSettings, now: datetime
) -> dict[int, tuple[str, datetime]]:
    """`{channel id: (override key, cutoff)}` for channels with their own retention."""
    exact: dict[int, tuple[str, datetime]] = {}
    chat_wide: dict[int, tuple[str, datetime]] = {}
    for key, days in settings.retention_channels.items():
        platform, external_id, thread = _parse_key(key)
        query = select(Channel.id).where(Channel.platform == platform, Channel.external_id == external_id)
        if thread is not None:
            query = query.where(Channel.thread_id == thread)
        target = exact if thread is not None else chat_wide
        for channel_id in (await session.execute(query)).scalars():
            target[channel_id] = (key, now - timedelta(days=days))
    return chat_wide | exact  # a thread's own entry beats its chat's


def _prunable(cutoff: datetime) -> Any:
    """Messages older than `cutoff` that no unfinished job or delivery needs."""
    live_job = exists().where(
        ReplyJob.trigger_message_id == Message.id, ReplyJob.status.in_((JobStatus.PENDING, JobStatus.RUNNING))
    )
    live_delivery = exists().where(
        OutboxDelivery.message_id == Message.id,
        OutboxDelivery.status.in_((OutboxStatus.PENDING, OutboxStatus.SENDING)),
    )
    return (Message.created_at < cutoff) & ~live_job & ~live_delivery


async def _delete_batch(store: Store, condition: Any) -> int:
    async with store.transaction() as session:
        ids = list((await session.execute(select(Message.id).where(condition).limit(BATCH))).scalars())
        if not ids:
            return 0
        # Children first: the schema cascades too, but this does not depend on SQLite's pragma.
        await session.execute(delete(OutboxDelivery).where(OutboxDelivery.message_id.in_(ids)))
        await session.execute(delete(ReplyJob).where(ReplyJob.trigger_message_id.in_(ids)))
        await session.execute(
            update(ReplyJob).where(ReplyJob.reply_message_id.in_(ids)).values(reply_message_id=None)
        )
        await session.execute(delete(Message).where(Message.id.in_(ids)))
        return len(ids)


async def _delete_all(store: Store, condition: Any) -> int:
    total = 0
    while True:
        count = await _delete_batch(store, condition)
        total += count
        if count < BATCH:
            return total


async def prune(store: Store, settings: SchedulerSettings, now: datetime) -> dict[str, Any]:
    """Delete what retention allows at `now`; returns counts for the run's record."""
    async with store.transaction() as session:
        overrides = await channel_cutoffs(session, settings, now)
    detail: dict[str, Any] = {"deleted_messages": 0, "channels": {}}
    if settings.retention_days is not None:
        cutoff = now - timedelta(days=settings.retention_days)
        condition = _prunable(cutoff)
        if overrides:
            condition = condition & Message.channel_id.not_in(list(overrides))
        detail["global_cutoff"] = cutoff.isoformat()
        detail["deleted_messages"] = await _delete_all(store, condition)
    for channel_id, (key, cutoff) in sorted(overrides.items()):
        count = await _delete_all(store, _prunable(cutoff) & (Message.channel_id == channel_id))
        detail["channels"][key] = detail["channels"].get(key, 0) + count
        detail["deleted_messages"] += count
    # Scheduled posts have no trigger message; their finished jobs age out with the global setting.
    if settings.retention_days is not None:
        cutoff = now - timedelta(days=settings.retention_days)
        async with store.transaction() as session:
            gone = await session.execute(
                delete(ReplyJob).where(
                    ReplyJob.trigger_message_id.is_(None),
                    ReplyJob.status.in_((JobStatus.DONE, JobStatus.FAILED)),
                    ReplyJob.finished_at < cutoff,
                )
            )
        detail["deleted_scheduled_jobs"] = rowcount(gone)
    log.info("retention: deleted %d messages", detail["deleted_messages"])
    return detail
