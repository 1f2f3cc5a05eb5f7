"""`/forget`: erasing what the store holds of one user in one chat.

A user's messages in the chat go, with the reply jobs they triggered and the bot's replies to them
(those replies answer, and often quote, the user's words; left alone they would also be orphaned
assistant turns in later prompts), including replies still waiting in the outbox. An `Erasure` row per
channel records the request, so training exports written before it can be scrubbed too.

"The chat" is the platform chat with all its threads / forum topics: a user who asks to be forgotten in
a group does not expect their words to survive in another topic of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, exists, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import AuthorRef, ChannelRef, utcnow
from bot.store.engine import rowcount
from bot.store.models import Channel, Erasure, Message, OutboxDelivery, ReplyJob, User


@dataclass(frozen=True)
class ErasureResult:
    messages: int  # the user's own messages deleted
    replies: int  # the bot's replies to them deleted
    jobs: int  # reply jobs they triggered deleted (pending ones included: they are never answered)
    erasure_ids: tuple[int, ...]  # the Erasure rows recorded, one per channel of the chat


async def forget_user(session: AsyncSession, author: AuthorRef, channel: ChannelRef) -> ErasureResult:
    """Erase `author`'s messages, the jobs they triggered and the replies to them in `channel`'s chat.

    Runs in the caller's transaction, so a failure erases nothing. The user's row itself is deleted
    too when none of their messages remain anywhere in the store.
    """
    channel_ids = list(
        (
            await session.execute(
                select(Channel.id).where(
                    Channel.platform == channel.platform, Channel.external_id == channel.external_id
                )
            )
        ).scalars()
    )
    user_id = (
        await session.execute(
            select(User.id).where(User.platform == author.platform, User.external_id == author.external_id)
        )
    ).scalar_one_or_none()

    messages = replies = job_count = 0
    if user_id is not None and channel_ids:
        own = select(Message.id).where(Message.channel_id.in_(channel_ids), Message.user_id == user_id)
        triggered = select(ReplyJob.id).where(ReplyJob.trigger_message_id.in_(own))
        reply_ids = list(
            (
                await session.execute(
                    select(ReplyJob.reply_message_id).where(
                        ReplyJob.id.in_(triggered), ReplyJob.reply_message_id.is_not(None)
                    )
                )
            ).scalars()
        )
        # Children first: the schema cascades too, but SQLite only with its foreign_keys pragma on.
        await session.execute(delete(OutboxDelivery).where(OutboxDelivery.message_id.in_(reply_ids)))
        job_count = rowcount(await session.execute(delete(ReplyJob).where(ReplyJob.id.in_(triggered))))
        replies = rowcount(await session.execute(delete(Message).where(Message.id.in_(reply_ids))))
        messages = rowcount(await session.execute(delete(Message).where(Message.id.in_(own))))
        if not (await session.execute(select(exists().where(Message.user_id == user_id)))).scalar():
            await session.execute(delete(User).where(User.id == user_id))

    now = utcnow()
    erasure_ids: list[int] = []
    targets: list[int | None] = [*channel_ids] if channel_ids else [None]
    for channel_id in targets:
        erasure_ids.append(
            (
                await session.execute(
                    insert(Erasure)
                    .values(
                        platform=author.platform,
                        user_external_id=author.external_id,
                        channel_id=channel_id,
                        requested_at=now,
                    )
                    .returning(Erasure.id)
                )
            ).scalar_one()
        )
    return ErasureResult(messages, replies, job_count, tuple(erasure_ids))


async def erasures_for(session: AsyncSession, platform: str, user_external_id: str) -> list[Erasure]:
    """The recorded erasures of one user, oldest first (for scrubbing exports)."""
    rows = await session.execute(
        select(Erasure)
        .where(Erasure.platform == platform, Erasure.user_external_id == user_external_id)
        .order_by(Erasure.id)
    )
    return list(rows.scalars())
