"""The conversation store: one SQLAlchemy database that is also the job queue and the outbox.

Queries are plain async functions that take a session (`conversations`, `jobs`, `outbox`), so
several of them compose into one transaction:

    async with store.transaction() as session:
        stored = await conversations.ingest(session, event)
        await jobs.enqueue(session, channel_id=stored.channel_id, ...)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from bot.store import conversations, jobs, outbox, streams
from bot.store.engine import create_engine, normalize_url
from bot.store.group import GroupCommit
from bot.store.wakeups import Wakeups, committed_topics, notify_before_commit

__all__ = ["Store", "conversations", "jobs", "outbox", "streams"]


class Store:
    """An open database: the engine plus a session factory."""

    def __init__(self, url: str, **engine_kwargs: object) -> None:
        self.url = normalize_url(url).render_as_string(hide_password=False)
        self.engine: AsyncEngine = create_engine(self.url, **engine_kwargs)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self.wakeups = Wakeups(self.engine)
        # Writes that come together (replies written, deliveries recorded) share a commit.
        self.group = GroupCommit(self)
        # SQLite has one writer: transactions of this process take turns here instead of meeting in
        # SQLite's busy handler, which sleeps (up to 100 ms a time) whenever two collide.
        self._turn = asyncio.Lock() if self.dialect == "sqlite" else None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in one transaction: committed on success, rolled back on any error.

        Once it commits, the loops its writes made work for are woken (`bot.store.wakeups`).
        """
        async with contextlib.AsyncExitStack() as stack:
            if self._turn is not None:
                await stack.enter_async_context(self._turn)
            session = await stack.enter_async_context(self._sessions())
            async with session.begin():
                yield session
                await notify_before_commit(session)
            topics = committed_topics(session)
            if topics:
                self.wakeups.fire(topics)

    @asynccontextmanager
    async def single_statement(self) -> AsyncIterator[AsyncSession]:
        """A session for work that is one statement, which commits by itself: on PostgreSQL in
        autocommit mode, without the BEGIN and COMMIT round trips of `transaction`; elsewhere a
        `transaction`. Its writes may not wake anyone (`bot.store.wakeups.wake`)."""
        if self.dialect != "postgresql":
            async with self.transaction() as session:
                yield session
            return
        async with self.engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            async with AsyncSession(bind=connection, expire_on_commit=False) as session:
                yield session
                if committed_topics(session):
                    raise RuntimeError("a single statement cannot wake anyone: use Store.transaction")

    async def upgrade(self) -> None:
        """Bring the schema to the newest migration (Alembic)."""
        from bot.migrate import upgrade

        await upgrade(self.engine)

    async def close(self) -> None:
        await self.wakeups.close()
        await self.engine.dispose()
