"""Replies being generated, shared between processes: a worker writes each reply's text as it grows;
the bot process serving the platform follows it (typing indicator, streamed edits).

One row per reply job while it is generated. The first bot process of the platform to see a row
becomes its `follower`, so two frontends never both post a preview. A worker writing to a row nobody
follows (no frontend of that platform is running) removes it at the end; a follower removes the rows
it has finished showing. Every write wakes the topic `stream:<platform>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import ChannelRef, utcnow
from bot.store.conversations import _insert_for, channel_ref, storable_text
from bot.store.models import Channel, ReplyJob, ReplyStream
from bot.store.wakeups import wake


def topic(platform: str) -> str:
    return f"stream:{platform}"


async def started(session: AsyncSession, job_id: int, platform: str) -> None:
    insert = _insert_for(session)(ReplyStream).values(
        job_id=job_id, platform=platform, state="running", text="", updated_at=utcnow()
    )
    await session.execute(
        insert.on_conflict_do_update(
            index_elements=["job_id"], set_={"state": "running", "text": "", "updated_at": utcnow()}
        )
    )
    await wake(session, topic(platform))


async def grew(session: AsyncSession, job_id: int, platform: str, text: str) -> None:
    await session.execute(
        update(ReplyStream)
        .where(ReplyStream.job_id == job_id, ReplyStream.state == "running")
        .values(text=storable_text(text), updated_at=utcnow())
    )
    await wake(session, topic(platform))


async def ended(session: AsyncSession, job_id: int, platform: str, ok: bool) -> None:
    """The reply is written (or failed): followed rows say so, unfollowed ones go."""
    await session.execute(
        delete(ReplyStream).where(ReplyStream.job_id == job_id, ReplyStream.follower.is_(None))
    )
    await session.execute(
        update(ReplyStream)
        .where(ReplyStream.job_id == job_id)
        .values(state="done" if ok else "failed", updated_at=utcnow())
    )
    await wake(session, topic(platform))


@dataclass(frozen=True)
class StreamState:
    job_id: int
    channel: ChannelRef
    persona: str
    state: str
    text: str
    updated_at: datetime


async def follow(session: AsyncSession, platform: str, follower: str) -> list[StreamState]:
    """Take the platform's unfollowed streams, then return every stream this follower shows."""
    await session.execute(
        update(ReplyStream)
        .where(ReplyStream.platform == platform, ReplyStream.follower.is_(None))
        .values(follower=follower)
    )
    rows = await session.execute(
        select(ReplyStream, ReplyJob.persona, Channel)
        .join(ReplyJob, ReplyJob.id == ReplyStream.job_id)
        .join(Channel, Channel.id == ReplyJob.channel_id)
        .where(ReplyStream.platform == platform, ReplyStream.follower == follower)
        .order_by(ReplyStream.job_id)
    )
    return [
        StreamState(row.job_id, channel_ref(channel), persona, row.state, row.text, row.updated_at)
        for row, persona, channel in rows
    ]


async def forget(session: AsyncSession, job_ids: list[int]) -> None:
    """Streams this follower has finished showing."""
    await session.execute(delete(ReplyStream).where(ReplyStream.job_id.in_(job_ids)))


async def remember_preview(session: AsyncSession, job_id: int, streamed_id: str) -> None:
    """The platform id of the message previewing a job's reply, for its final delivery to edit."""
    await session.execute(update(ReplyJob).where(ReplyJob.id == job_id).values(streamed_id=streamed_id))
