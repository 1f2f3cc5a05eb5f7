"""Conversation queries: ingesting platform events, history for prompts, resets, edits, deletes, bindings."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import AuthorRef, ChannelKind, ChannelRef, Deleted, Edited, Incoming, utcnow
from bot.store.engine import dialect_of, rowcount
from bot.store.models import Base, Channel, ChannelPersona, Message, User


@dataclass(frozen=True)
class IngestResult:
    message_id: int
    channel_id: int
    user_id: int
    created: bool  # False when the platform redelivered an event already stored


@dataclass(frozen=True)
class HistoryMessage:
    """One message as a prompt sees it."""

    id: int
    role: str
    text: str
    author: str
    persona: str | None
    created_at: datetime


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_text(text: str) -> str:
    """Text every backend can store: no NUL (PostgreSQL rejects it), lone surrogates as U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text.replace("\x00", ""))


def channel_ref(channel: Channel) -> ChannelRef:
    """A stored channel as the adapters name it."""
    return ChannelRef(
        platform=channel.platform,
        external_id=channel.external_id,
        kind=ChannelKind(channel.kind),
        thread_id=channel.thread_id,
        title=channel.title,
    )


async def channel_by_id(session: AsyncSession, channel_id: int) -> ChannelRef | None:
    """The stored channel `channel_id` as the adapters name it; None when it is gone."""
    channel = await session.get(Channel, channel_id)
    return None if channel is None else channel_ref(channel)


def _insert_for(session: AsyncSession) -> Callable[[type[Base]], postgresql.Insert]:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING on both backends.

    Typed as PostgreSQL's: SQLite's has the same `on_conflict_do_*` and `excluded` API.
    """
    if dialect_of(session) == "postgresql":
        return postgresql.insert
    return cast(Callable[[type[Base]], postgresql.Insert], sqlite.insert)


async def upsert_channel(session: AsyncSession, ref: ChannelRef) -> int:
    insert = _insert_for(session)
    await session.execute(
        insert(Channel)
        .values(
            platform=ref.platform,
            external_id=ref.external_id,
            thread_id=ref.thread_id,
            kind=ref.kind.value,
            title=ref.title,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["platform", "external_id", "thread_id"])
    )
    return (
        await session.execute(
            select(Channel.id).where(
                Channel.platform == ref.platform,
                Channel.external_id == ref.external_id,
                Channel.thread_id == ref.thread_id,
            )
        )
    ).scalar_one()


async def find_channel(session: AsyncSession, ref: ChannelRef) -> int | None:
    return (
        await session.execute(
            select(Channel.id).where(
                Channel.platform == ref.platform,
                Channel.external_id == ref.external_id,
                Channel.thread_id == ref.thread_id,
            )
        )
    ).scalar_one_or_none()


async def upsert_user(session: AsyncSession, ref: AuthorRef) -> int:
    insert = _insert_for(session)
    stmt = insert(User).values(
        platform=ref.platform,
        external_id=ref.external_id,
        display_name=ref.display_name,
        is_bot=ref.is_bot,
        training_opt_in=False,
        created_at=utcnow(),
    )
    # Keep the display name current; everything else about the user is left alone.
    stmt = stmt.on_conflict_do_update(
        index_elements=["platform", "external_id"], set_={"display_name": stmt.excluded.display_name}
    )
    await session.execute(stmt)
    return (
        await session.execute(
            select(User.id).where(User.platform == ref.platform, User.external_id == ref.external_id)
        )
    ).scalar_one()


async def ingest(session: AsyncSession, event: Incoming) -> IngestResult:
    """Store a user's message once, however often the platform delivers it."""
    channel_id = await upsert_channel(session, event.channel)
    user_id = await upsert_user(session, event.author)
    insert = _insert_for(session)
    inserted = (
        await session.execute(
            insert(Message)
            .values(
                channel_id=channel_id,
                user_id=user_id,
                role="user",
                text=storable_text(event.text),
                platform_message_id=event.platform_message_id,
                reply_to=event.reply_to,
                created_at=event.sent_at,
            )
            .on_conflict_do_nothing(index_elements=["channel_id", "platform_message_id"])
            .returning(Message.id)
        )
    ).scalar_one_or_none()
    if inserted is not None:
        await session.execute(
            update(Channel).where(Channel.id == channel_id).values(last_message_at=event.sent_at)
        )
        return IngestResult(inserted, channel_id, user_id, created=True)
    existing = (
        await session.execute(
            select(Message.id).where(
                Message.channel_id == channel_id, Message.platform_message_id == event.platform_message_id
            )
        )
    ).scalar_one()
    return IngestResult(existing, channel_id, user_id, created=False)


async def apply_edit(session: AsyncSession, event: Edited) -> bool:
    """Replace a stored message's text; False when the store never saw that message."""
    channel_id = await find_channel(session, event.channel)
    if channel_id is None:
        return False
    result = await session.execute(
        update(Message)
        .where(
            Message.channel_id == channel_id,
            Message.platform_message_id == event.platform_message_id,
            Message.deleted_at.is_(None),
            # Platforms echo edits of the bot's own (streamed) messages; the stored reply stays as written.
            Message.role == "user",
        )
        .values(text=storable_text(event.text), edited_at=event.edited_at)
    )
    return rowcount(result) > 0


async def apply_delete(session: AsyncSession, event: Deleted) -> bool:
    """Erase a deleted message's text and hide it from every later prompt."""
    channel_id = await find_channel(session, event.channel)
    if channel_id is None:
        return False
    result = await session.execute(
        update(Message)
        .where(Message.channel_id == channel_id, Message.platform_message_id == event.platform_message_id)
        .values(text="", deleted_at=event.deleted_at)
    )
    return rowcount(result) > 0


async def history(session: AsyncSession, channel_id: int, limit: int = 500) -> list[HistoryMessage]:
    """The channel's visible messages since its last `/reset`, oldest first (at most `limit`); replies
    marked `excluded_from_prompts` are left out."""
    floor = (
        await session.execute(select(Channel.context_floor_id).where(Channel.id == channel_id))
    ).scalar_one_or_none()
    query = (
        select(Message, User.display_name)
        .outerjoin(User, User.id == Message.user_id)
        .where(
            Message.channel_id == channel_id,
            Message.deleted_at.is_(None),
            Message.excluded_from_prompts.is_(False),
        )
        .order_by(Message.id.desc())
        .limit(limit)
    )
    if floor is not None:
        query = query.where(Message.id > floor)
    rows = (await session.execute(query)).all()
    return [
        HistoryMessage(
            id=m.id, role=m.role, text=m.text, author=name or "", persona=m.persona, created_at=m.created_at
        )
        for m, name in reversed(rows)
    ]


async def reset_context(session: AsyncSession, channel_id: int) -> None:
    """Later prompts start after the newest message now stored; nothing is deleted."""
    newest = (
        await session.execute(select(func.max(Message.id)).where(Message.channel_id == channel_id))
    ).scalar_one_or_none()
    await session.execute(
        update(Channel).where(Channel.id == channel_id).values(context_floor_id=newest or 0)
    )


async def bound_personas(session: AsyncSession, channel_id: int) -> list[str]:
    rows = await session.execute(
        select(ChannelPersona.persona)
        .where(ChannelPersona.channel_id == channel_id)
        .order_by(ChannelPersona.created_at, ChannelPersona.persona)
    )
    return list(rows.scalars())


async def bind_persona(
    session: AsyncSession, channel_id: int, persona: str, bound_by: str | None, exclusive: bool = True
) -> None:
    """Bind `persona` to the channel; `exclusive` replaces the personas bound before."""
    if exclusive:
        await session.execute(delete(ChannelPersona).where(ChannelPersona.channel_id == channel_id))
    insert = _insert_for(session)
    await session.execute(
        insert(ChannelPersona)
        .values(channel_id=channel_id, persona=persona, bound_by=bound_by, created_at=utcnow())
        .on_conflict_do_nothing(index_elements=["channel_id", "persona"])
    )


async def unbind_persona(session: AsyncSession, channel_id: int, persona: str | None = None) -> None:
    """Unbind `persona` from the channel, or every persona (None): the default persona answers again."""
    query = delete(ChannelPersona).where(ChannelPersona.channel_id == channel_id)
    if persona is not None:
        query = query.where(ChannelPersona.persona == persona)
    await session.execute(query)
