"""`/optin` and `/optout`: may a user's conversations be used to retrain personas?

The state is per user (`users.training_opt_in`) with the time it last changed, so an export only takes
messages written while the user was opted in: opting in later does not pull in older messages.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from bot.events import AuthorRef, utcnow
from bot.store.conversations import upsert_user
from bot.store.models import Channel, Erasure, JobStatus, Message, ReplyJob, User


async def set_training_opt_in(
    session: AsyncSession, author: AuthorRef, opted_in: bool, *, at: datetime | None = None
) -> bool:
    """Record the user's choice, made at `at` (the command's own time; default now).

    Returns False when it was already that (nothing changes then).
    """
    user_id = await upsert_user(session, author)
    current = (await session.execute(select(User.training_opt_in).where(User.id == user_id))).scalar_one()
    if bool(current) == opted_in:
        return False
    await session.execute(
        update(User)
        .where(User.id == user_id)
        .values(training_opt_in=opted_in, opt_in_changed_at=at or utcnow())
    )
    return True


async def training_opt_in(session: AsyncSession, author: AuthorRef) -> tuple[bool, datetime | None]:
    """The user's current choice and when it was made (False, None for users never seen)."""
    row = (
        await session.execute(
            select(User.training_opt_in, User.opt_in_changed_at).where(
                User.platform == author.platform, User.external_id == author.external_id
            )
        )
    ).one_or_none()
    return (bool(row[0]), row[1]) if row is not None else (False, None)


class Exchange(NamedTuple):
    """A user's message and the persona's reply to it, with who wrote it where (for training exports)."""

    message_id: int
    text: str
    asked_at: datetime
    reply: str
    replied_at: datetime
    user_platform: str
    user_external_id: str
    channel_platform: str
    channel_external_id: str
    thread_id: str
    context_floor_id: int | None


async def exportable_exchanges(
    session: AsyncSession, persona: str, *, since: datetime | None = None, until: datetime | None = None
) -> list[Exchange]:
    """`persona`'s answered exchanges that may be exported, by channel then message (`bot.export`'s rules):

    the reply job finished; neither message is deleted; the user is no bot, is opted in, and wrote the
    message after opting in; no `/forget` erasure of that user (in that chat or everywhere) came after it.
    """
    asked = aliased(Message)
    answer = aliased(Message)
    erased = exists().where(
        Erasure.platform == User.platform,
        Erasure.user_external_id == User.external_id,
        or_(Erasure.channel_id.is_(None), Erasure.channel_id == asked.channel_id),
        Erasure.requested_at >= asked.created_at,
    )
    query = (
        select(
            asked.id,
            asked.text,
            asked.created_at,
            answer.text,
            answer.created_at,
            User.platform,
            User.external_id,
            Channel.platform,
            Channel.external_id,
            Channel.thread_id,
            Channel.context_floor_id,
        )
        .select_from(ReplyJob)
        .join(asked, asked.id == ReplyJob.trigger_message_id)
        .join(answer, answer.id == ReplyJob.reply_message_id)
        .join(User, User.id == asked.user_id)
        .join(Channel, Channel.id == asked.channel_id)
        .where(
            ReplyJob.persona == persona,
            ReplyJob.status == JobStatus.DONE,
            asked.role == "user",
            asked.deleted_at.is_(None),
            answer.deleted_at.is_(None),
            User.is_bot.is_(False),
            User.training_opt_in.is_(True),
            User.opt_in_changed_at.is_not(None),
            User.opt_in_changed_at <= asked.created_at,
            ~erased,
        )
        .order_by(asked.channel_id, asked.id)
    )
    if since is not None:
        query = query.where(asked.created_at >= since)
    if until is not None:
        query = query.where(asked.created_at < until)
    return [Exchange(*row) for row in await session.execute(query)]


async def opted_out_users(session: AsyncSession) -> list[tuple[str, str]]:
    """(platform, external id) of every user opted out now."""
    rows = await session.execute(
        select(User.platform, User.external_id).where(User.training_opt_in.is_(False))
    )
    return [(str(p), str(e)) for p, e in rows]


async def erasures(session: AsyncSession) -> list[tuple[str, str, str | None, str | None]]:
    """Every `/forget`: (platform, user external id, channel platform, channel external id); the
    channel is None for an erasure everywhere."""
    rows = await session.execute(
        select(Erasure.platform, Erasure.user_external_id, Channel.platform, Channel.external_id).outerjoin(
            Channel, and_(Channel.id == Erasure.channel_id)
        )
    )
    return [(p, u, cp, ce) for p, u, cp, ce in rows]
