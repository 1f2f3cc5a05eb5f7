"""Wake-ups instead of idle polling: a loop waiting for rows is woken when they are written.

A write that makes work for a loop calls `wake(session, topic)` in its transaction ("jobs" for the
worker, "outbox:<platform>" for that platform's outbox pump). When the transaction commits, waiters in
this process are woken at once; on PostgreSQL the same transaction also sends `NOTIFY personabot,
'<topic>'` (one statement for all its topics, just before it commits), which PostgreSQL delivers at commit to every process listening (one extra connection per
process, opened by the first waiter). A rolled-back transaction wakes nobody. Waiters still poll
slowly as a safety net: for rows that become due by time (backoff, an expired lease) and for
notifications missed while the listening connection was down.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, String, TextClause, func, literal, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from bot.backoff import backoff
from bot.store.engine import dialect_of

log = logging.getLogger(__name__)

CHANNEL = "personabot"
_PENDING = "personabot.wake"  # session.info key: topics to wake once the transaction commits


_NOTIFIED = "personabot.notified"  # session.info key: topics a write of the transaction NOTIFYed itself


async def wake(session: AsyncSession, topic: str, *, notified: bool = False) -> None:
    """Wake the waiters of `topic` once this transaction commits (in every process on PostgreSQL).

    `notified`: a statement of this transaction already sent the NOTIFY (`notify_sql` in its
    RETURNING), so `notify_before_commit` need not."""
    session.info.setdefault(_PENDING, set()).add(topic)
    if notified:
        session.info.setdefault(_NOTIFIED, set()).add(topic)


def notify_sql(topic: BindParameter[str]) -> ColumnElement[Any]:
    """PostgreSQL: `pg_notify('personabot', <topic>)` for a write's RETURNING, evaluated only for the
    rows it writes: the wake-up travels with the write instead of in a statement of its own.
    PostgreSQL sends a transaction's identical notifications once."""
    return func.pg_notify(literal(CHANNEL, String), topic)


async def notify_before_commit(session: AsyncSession) -> None:
    """PostgreSQL: send the transaction's wake-ups as NOTIFYs, all in one statement (delivered by
    PostgreSQL at commit, dropped by a rollback); those a write sent itself are left out.
    `Store.transaction` calls it last thing."""
    topics = session.info.get(_PENDING, set()) - session.info.get(_NOTIFIED, set())
    if topics and dialect_of(session) == "postgresql":
        ordered = sorted(topics)
        params = {f"t{i}": topic for i, topic in enumerate(ordered)}
        await session.execute(_notify_sql(len(ordered)), {"channel": CHANNEL, **params})


@functools.cache
def _notify_sql(count: int) -> TextClause:
    return text("SELECT " + ", ".join(f"pg_notify(:channel, :t{i})" for i in range(count)))


def committed_topics(session: AsyncSession) -> set[str]:
    """The topics a committed transaction woke (taken, so they are fired once)."""
    session.info.pop(_NOTIFIED, None)
    topics: set[str] = session.info.pop(_PENDING, set())
    return topics


class Wakeups:
    """The waiting side: one event per topic, set by local commits and by PostgreSQL notifications."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine  # the store's; PostgreSQL notifications are listened for on its database
        self._events: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task[None] | None = None

    def _event(self, topic: str) -> asyncio.Event:
        return self._events.setdefault(topic, asyncio.Event())

    def fire(self, topics: set[str] | list[str]) -> None:
        for topic in topics:
            self._event(topic).set()

    def fire_all(self) -> None:
        for event in self._events.values():
            event.set()

    def clear(self, topic: str) -> None:
        """Forget earlier wake-ups of `topic`: call before looking for work, then `wait` if none."""
        self._event(topic).clear()
        self._listen()

    async def wait(self, topic: str, timeout: float, stop: asyncio.Event | None = None) -> bool:
        """Until `topic` is woken (True), `stop` is set, or `timeout` seconds pass (False)."""
        self._listen()
        event = self._event(topic)
        waits = [asyncio.ensure_future(event.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return event.is_set()

    def _listen(self) -> None:
        if self._listener is None and self.engine.dialect.name == "postgresql":
            self._listener = asyncio.create_task(self._listen_forever(), name="store-notifications")

    async def _listen_forever(self) -> None:
        """LISTEN on a connection of its own; reconnects with backoff, waking every waiter when it
        comes back (notifications sent meanwhile are lost)."""
        import asyncpg

        url = self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        failures = 0
        while True:
            conn: Any = None
            try:
                conn = await asyncpg.connect(url)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _conn, done=lost: done.set())
                await conn.add_listener(CHANNEL, lambda _c, _pid, _ch, topic: self.fire([topic]))
                if failures:
                    log.info("store notifications: listening again")
                    self.fire_all()
                failures = 0
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "store notifications: cannot listen (%s); polling until it is back",
                        type(exc).__name__,
                    )
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close(timeout=1)
            await asyncio.sleep(backoff(max(failures, 1), base=0.5, cap=5.0))

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
            self._listener = None
