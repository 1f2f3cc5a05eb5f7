"""Conversation queries: ingesting platform events, history for prompts, resets, edits, deletes, bindings."""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BindParameter,
    Executable,
    Select,
    Table,
    bindparam,
    case,
    delete,
    func,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import AuthorRef, ChannelKind, ChannelRef, Deleted, Edited, Incoming, utcnow
from bot.store.engine import dialect_of, rowcount
from bot.store.models import Base, Channel, ChannelPersona, Message, User, table_of


@dataclass(frozen=True)
class IngestResult:
    message_id: int
    channel_id: int
    user_id: int
    created: bool  # False when the platform redelivered an event already stored
    bound: tuple[str, ...] = ()  # the personas bound to the channel, first bound first (`bound_personas`)


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


_channels = table_of(Channel)
# Built once: statement construction and cache-key work cost more than the query (`bench_pipeline`).
_CHANNELS = select(
    _channels.c.id,
    _channels.c.platform,
    _channels.c.external_id,
    _channels.c.kind,
    _channels.c.thread_id,
    _channels.c.title,
).where(_channels.c.id.in_(bindparam("ids", expanding=True)))


async def channels_by_id(session: AsyncSession, ids: Iterable[int]) -> dict[int, ChannelRef]:
    """The stored channels among `ids`, as the adapters name them (gone ones are left out)."""
    rows = await session.execute(_CHANNELS, {"ids": sorted(set(ids))})
    return {
        row.id: ChannelRef(row.platform, row.external_id, ChannelKind(row.kind), row.thread_id, row.title)
        for row in rows
    }


async def channel_by_id(session: AsyncSession, channel_id: int) -> ChannelRef | None:
    """The stored channel `channel_id` as the adapters name it; None when it is gone."""
    channel = await session.get(Channel, channel_id)
    return None if channel is None else channel_ref(channel)


def _insert_for(session: AsyncSession) -> Callable[[type[Base]], postgresql.Insert]:
    """`_dialect_insert` for this session's database, taking a mapped class (the ORM's way)."""
    return cast(Callable[[type[Base]], postgresql.Insert], _dialect_insert(dialect_of(session)))


# Hot-path statements are built once per dialect, on the Core tables, with bound parameters: building
# an ORM statement and its cache key costs more CPU than running it. The `*_SQL` builders below take
# the dialect's name.
_channels, _users, _messages = table_of(Channel), table_of(User), table_of(Message)


def _dialect_insert(dialect: str) -> Callable[[Table], postgresql.Insert]:
    """The dialect's INSERT, which knows ON CONFLICT on both backends (typed as PostgreSQL's: SQLite's
    has the same `on_conflict_do_*` and `excluded` API)."""
    if dialect == "postgresql":
        return postgresql.insert
    return cast(Callable[[Table], postgresql.Insert], sqlite.insert)


_FIND_CHANNEL = select(_channels.c.id).where(
    _channels.c.platform == bindparam("platform"),
    _channels.c.external_id == bindparam("external_id"),
    _channels.c.thread_id == bindparam("thread_id"),
)
_FIND_USER = select(_users.c.id, _users.c.display_name).where(
    _users.c.platform == bindparam("platform"), _users.c.external_id == bindparam("external_id")
)


@functools.cache
def _insert_channel_sql(dialect: str) -> Executable:
    return (
        _dialect_insert(dialect)(_channels)
        .on_conflict_do_nothing(index_elements=["platform", "external_id", "thread_id"])
        .returning(_channels.c.id)
    )


@functools.cache
def _ingest_channel_sql(dialect: str) -> Executable:
    """Insert the channel or, when it exists, move its `last_message_at` forward: its id either way."""
    return _channel_upsert(_dialect_insert(dialect)(_channels)).returning(_channels.c.id)


def _channel_upsert(stmt: postgresql.Insert) -> postgresql.Insert:
    """`stmt` (an INSERT of a channel) that, when the channel exists, moves its `last_message_at`
    forward only (a redelivered older message does not move it back)."""
    last, new = _channels.c.last_message_at, stmt.excluded.last_message_at
    return stmt.on_conflict_do_update(
        index_elements=["platform", "external_id", "thread_id"],
        set_={"last_message_at": case((or_(last.is_(None), last < new), new), else_=last)},
    )


@functools.cache
def _upsert_user_sql(dialect: str) -> Executable:
    stmt = _dialect_insert(dialect)(_users)
    # Keep the display name current; everything else about the user is left alone.
    return stmt.on_conflict_do_update(
        index_elements=["platform", "external_id"], set_={"display_name": stmt.excluded.display_name}
    ).returning(_users.c.id)


@functools.cache
def _insert_message_sql(dialect: str) -> Executable:
    return (
        _dialect_insert(dialect)(_messages)
        .on_conflict_do_nothing(index_elements=["channel_id", "platform_message_id"])
        .returning(_messages.c.id)
    )


_FIND_MESSAGE = select(_messages.c.id).where(
    _messages.c.channel_id == bindparam("channel_id"),
    _messages.c.platform_message_id == bindparam("platform_message_id"),
)


def _channel_values(ref: ChannelRef) -> dict[str, object]:
    return {
        "platform": ref.platform,
        "external_id": ref.external_id,
        "thread_id": ref.thread_id,
        "kind": ref.kind.value,
        "title": ref.title,
        "created_at": utcnow(),
    }


async def upsert_channel(session: AsyncSession, ref: ChannelRef) -> int:
    """The channel's id, stored first if it is new."""
    key = {"platform": ref.platform, "external_id": ref.external_id, "thread_id": ref.thread_id}
    found = (await session.execute(_FIND_CHANNEL, key)).scalar_one_or_none()
    if found is not None:
        return int(found)
    inserted = (
        await session.execute(_insert_channel_sql(dialect_of(session)), _channel_values(ref))
    ).scalar_one_or_none()
    # None: another transaction stored it meanwhile.
    return int(inserted if inserted is not None else (await session.execute(_FIND_CHANNEL, key)).scalar_one())


async def find_channel(session: AsyncSession, ref: ChannelRef) -> int | None:
    key = {"platform": ref.platform, "external_id": ref.external_id, "thread_id": ref.thread_id}
    return (await session.execute(_FIND_CHANNEL, key)).scalar_one_or_none()


async def upsert_user(session: AsyncSession, ref: AuthorRef) -> int:
    """The user's id, stored first if new; a changed display name is updated."""
    found = (
        await session.execute(_FIND_USER, {"platform": ref.platform, "external_id": ref.external_id})
    ).one_or_none()
    if found is not None and found.display_name == ref.display_name:
        return int(found.id)  # the usual case: read only, no row lock
    values = {
        "platform": ref.platform,
        "external_id": ref.external_id,
        "display_name": ref.display_name,
        "is_bot": ref.is_bot,
        "training_opt_in": False,
        "created_at": utcnow(),
    }
    return int((await session.execute(_upsert_user_sql(dialect_of(session)), values)).scalar_one())


async def ingest(session: AsyncSession, event: Incoming) -> IngestResult:
    """Store a user's message once, however often the platform delivers it; the result names the
    personas bound to its channel too (the dispatcher's next question)."""
    dialect = dialect_of(session)
    if dialect == "postgresql":
        return await _ingest_pg(session, event)
    channel_id = (
        await session.execute(
            _ingest_channel_sql(dialect), {**_channel_values(event.channel), "last_message_at": event.sent_at}
        )
    ).scalar_one()
    user_id = await upsert_user(session, event.author)
    inserted = (
        await session.execute(
            _insert_message_sql(dialect),
            {
                "channel_id": channel_id,
                "user_id": user_id,
                "role": "user",
                "text": storable_text(event.text),
                "platform_message_id": event.platform_message_id,
                "reply_to": event.reply_to,
                "created_at": event.sent_at,
                "excluded_from_prompts": False,
            },
        )
    ).scalar_one_or_none()
    bound = tuple(await bound_personas(session, channel_id))
    if inserted is not None:
        return IngestResult(inserted, channel_id, user_id, created=True, bound=bound)
    existing = await _find_message(session, channel_id, event.platform_message_id)
    return IngestResult(existing, channel_id, user_id, created=False, bound=bound)


async def _find_message(session: AsyncSession, channel_id: int, platform_message_id: str | None) -> int:
    found = await session.execute(
        _FIND_MESSAGE, {"channel_id": channel_id, "platform_message_id": platform_message_id}
    )
    return int(found.scalar_one())


async def _ingest_pg(session: AsyncSession, event: Incoming) -> IngestResult:
    """PostgreSQL: `ingest` in one round trip (`_INGEST_PG`) instead of four or five."""
    channel, author = event.channel, event.author
    row = (
        await session.execute(
            _INGEST_PG,
            {
                "c_platform": channel.platform,
                "c_external_id": channel.external_id,
                "c_thread_id": channel.thread_id,
                "c_kind": channel.kind.value,
                "c_title": channel.title,
                "u_platform": author.platform,
                "u_external_id": author.external_id,
                "u_display_name": author.display_name,
                "u_is_bot": author.is_bot,
                "u_opt_in": False,
                "m_role": "user",
                "m_text": storable_text(event.text),
                "m_platform_message_id": event.platform_message_id,
                "m_reply_to": event.reply_to,
                "m_sent_at": event.sent_at,
                "m_excluded": False,
                "now": utcnow(),
            },
        )
    ).one()
    channel_id, user_id, bound = int(row.channel_id), int(row.user_id), tuple(row.bound)
    if row.message_id is not None:
        return IngestResult(int(row.message_id), channel_id, user_id, created=True, bound=bound)
    existing = await _find_message(session, channel_id, event.platform_message_id)
    return IngestResult(existing, channel_id, user_id, created=False, bound=bound)


def _ingest_pg_sql() -> Executable:
    """`WITH channel AS (upsert), found AS (the user), added AS (insert the user only when missing or
    renamed), message AS (insert, nothing on a redelivery) SELECT ids, bound personas`.

    The user row is written (and locked) only when it is new or renamed, as in `upsert_user`.
    Parameters are named unlike any column: an INSERT would take one named like a column as a value.
    """
    ch, us, ms, bd = _channels.c, _users.c, _messages.c, _bindings.c
    p = bindparam
    channel_stmt = postgresql.insert(_channels).values(
        platform=p("c_platform", type_=ch.platform.type),
        external_id=p("c_external_id", type_=ch.external_id.type),
        thread_id=p("c_thread_id", type_=ch.thread_id.type),
        kind=p("c_kind", type_=ch.kind.type),
        title=p("c_title", type_=ch.title.type),
        created_at=p("now", type_=ch.created_at.type),
        last_message_at=p("m_sent_at", type_=ch.last_message_at.type),
    )
    channel = _channel_upsert(channel_stmt).returning(ch.id).cte("channel")
    display_name = p("u_display_name", type_=us.display_name.type)
    found = (
        select(us.id, us.display_name)
        .where(
            us.platform == p("u_platform", type_=us.platform.type),
            us.external_id == p("u_external_id", type_=us.external_id.type),
        )
        .cte("found")
    )
    user_stmt = postgresql.insert(_users).from_select(
        ["platform", "external_id", "display_name", "is_bot", "training_opt_in", "created_at"],
        select(
            p("u_platform", type_=us.platform.type),
            p("u_external_id", type_=us.external_id.type),
            display_name,
            p("u_is_bot", type_=us.is_bot.type),
            p("u_opt_in", type_=us.training_opt_in.type),
            p("now", type_=us.created_at.type),
        ).where(~select(found.c.id).where(found.c.display_name == display_name).exists()),
    )
    added = (
        user_stmt.on_conflict_do_update(
            index_elements=["platform", "external_id"], set_={"display_name": user_stmt.excluded.display_name}
        )
        .returning(us.id)
        .cte("added")
    )
    user_id = func.coalesce(select(added.c.id).scalar_subquery(), select(found.c.id).scalar_subquery())
    message = (
        postgresql.insert(_messages)
        .from_select(
            [
                "channel_id",
                "user_id",
                "role",
                "text",
                "platform_message_id",
                "reply_to",
                "created_at",
                "excluded_from_prompts",
            ],
            select(
                channel.c.id,
                user_id,
                p("m_role", type_=ms.role.type),
                p("m_text", type_=ms.text.type),
                p("m_platform_message_id", type_=ms.platform_message_id.type),
                p("m_reply_to", type_=ms.reply_to.type),
                p("m_sent_at", type_=ms.created_at.type),
                p("m_excluded", type_=ms.excluded_from_prompts.type),
            ).select_from(channel),
        )
        .on_conflict_do_nothing(index_elements=["channel_id", "platform_message_id"])
        .returning(ms.id)
        .cte("message")
    )
    bound = func.array(
        select(bd.persona)
        .where(bd.channel_id == channel.c.id)
        .order_by(bd.created_at, bd.persona)
        .scalar_subquery()
    )
    return select(
        channel.c.id.label("channel_id"),
        user_id.label("user_id"),
        select(message.c.id).scalar_subquery().label("message_id"),
        bound.label("bound"),
    ).select_from(channel)


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


def _channel_history(n: int) -> Select[Any]:
    """The `limit` newest visible messages of the channel bound as `channel_<n>`."""
    channel_id: BindParameter[int] = bindparam(f"channel_{n}")
    return (
        select(
            _messages.c.channel_id,
            _messages.c.id,
            _messages.c.role,
            _messages.c.text,
            _users.c.display_name,
            _messages.c.persona,
            _messages.c.created_at,
        )
        .select_from(_messages.outerjoin(_users, _users.c.id == _messages.c.user_id))
        .where(
            _messages.c.channel_id == channel_id,
            # After the channel's `/reset` floor, if any (ids start at 1).
            _messages.c.id
            > func.coalesce(
                select(_channels.c.context_floor_id).where(_channels.c.id == channel_id).scalar_subquery(),
                0,
            ),
            _messages.c.deleted_at.is_(None),
            _messages.c.excluded_from_prompts.is_(False),
        )
        .order_by(_messages.c.id.desc())
        .limit(bindparam("limit"))
    )


@functools.cache
def _histories_sql(channels: int) -> Executable:
    """The histories of `channels` channels in one statement: each channel's own index scan, newest
    first and cut at `limit` (a UNION ALL of per-channel subqueries, which SQLite and PostgreSQL both
    run; a window function would read every message of a long channel)."""
    parts = [
        select(*sub.c).select_from(sub) for sub in (_channel_history(n).subquery() for n in range(channels))
    ]
    return parts[0] if channels == 1 else union_all(*parts)


_BY_CHANNEL_THEN_ID = operator.itemgetter(0, 1)  # a history row's channel_id and id, compared in C


async def history(session: AsyncSession, channel_id: int, limit: int = 500) -> list[HistoryMessage]:
    """The channel's visible messages since its last `/reset`, oldest first (at most `limit`); replies
    marked `excluded_from_prompts` are left out."""
    return (await histories(session, [channel_id], limit)).get(channel_id, [])


async def histories(
    session: AsyncSession, channel_ids: Iterable[int], limit: int = 500
) -> dict[int, list[HistoryMessage]]:
    """`history` of several channels in one round trip (a worker's batch); a channel with no visible
    message is left out."""
    ids = sorted(set(channel_ids))
    if not ids:
        return {}
    params: dict[str, int] = {f"channel_{n}": channel_id for n, channel_id in enumerate(ids)}
    rows = (await session.execute(_histories_sql(len(ids)), {**params, "limit": limit})).all()
    found: dict[int, list[HistoryMessage]] = {}
    for m in sorted(rows, key=_BY_CHANNEL_THEN_ID):
        found.setdefault(m.channel_id, []).append(
            HistoryMessage(
                id=m.id,
                role=m.role,
                text=m.text,
                author=m.display_name or "",
                persona=m.persona,
                created_at=m.created_at,
            )
        )
    return found


async def reset_context(session: AsyncSession, channel_id: int) -> None:
    """Later prompts start after the newest message now stored; nothing is deleted."""
    newest = (
        await session.execute(select(func.max(Message.id)).where(Message.channel_id == channel_id))
    ).scalar_one_or_none()
    await session.execute(
        update(Channel).where(Channel.id == channel_id).values(context_floor_id=newest or 0)
    )


_bindings = table_of(ChannelPersona)
_BOUND = (
    select(_bindings.c.persona)
    .where(_bindings.c.channel_id == bindparam("channel_id"))
    .order_by(_bindings.c.created_at, _bindings.c.persona)
)


_INGEST_PG = _ingest_pg_sql()


async def bound_personas(session: AsyncSession, channel_id: int) -> list[str]:
    return list((await session.execute(_BOUND, {"channel_id": channel_id})).scalars())


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
