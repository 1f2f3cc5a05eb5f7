"""Opening the database: SQLite (WAL) in the event loop's thread, or PostgreSQL through asyncpg, one code path."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, CursorResult, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from bot.errors import StoreError
from bot.store import sqlite_inline

sqlite_inline.register()

# Plain URLs are mapped to the async driver personabot uses for them.
_ASYNC_DRIVERS = {
    "sqlite": "sqlite+inline",
    "sqlite+inline": "sqlite+inline",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


def normalize_url(url: str) -> URL:
    """Parse a database URL and switch it to its async driver; anything else is a `StoreError`."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"database_url: cannot parse {_redact(url)!r} as a database URL") from None
    driver = _ASYNC_DRIVERS.get(parsed.drivername)
    if driver is None:
        supported = "sqlite:///PATH, postgresql://USER@HOST/DB"
        raise StoreError(
            f"database_url: unsupported database scheme {parsed.drivername!r}; use one of: {supported}"
        )
    return parsed.set(drivername=driver)


def _redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable>"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers run beside the one writer; foreign keys are off by default in SQLite.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_busy_wait(dbapi_conn: Any, _record: Any) -> None:
    # aiosqlite waits for a locked database in its own thread; the inline driver waits itself, in the
    # event loop, and needs SQLite's own wait off (see bot.store.sqlite_inline).
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An async engine for `url`; creates the SQLite file's folder when needed."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        if parsed.drivername == "sqlite+aiosqlite":
            event.listen(engine.sync_engine, "connect", _sqlite_busy_wait)
        return engine
    engine = create_async_engine(parsed, **kwargs)
    if not kwargs.get("pool_pre_ping"):
        event.listen(engine.sync_engine.pool, "connect", _note_checkin)  # new: no ping needed
        event.listen(engine.sync_engine.pool, "checkin", _note_checkin)
        event.listen(engine.sync_engine.pool, "checkout", _ping_if_idle)
    return engine


# A pooled connection that sat idle longer than this is pinged before use, so one left over from
# before a database restart is replaced instead of failing a transaction. A connection in steady use
# is not: SQLAlchemy's `pool_pre_ping` adds a round trip to every transaction (`bench_pipeline` at
# 100 msg/s, alternating runs on a 2-core machine: p50 72-79 ms with it, 46-64 ms without). A
# connection that died since its last use fails its transaction; that marks the whole pool stale, and
# the callers try again (each one's outage path).
IDLE_BEFORE_PING_SECONDS = 2.0


def _note_checkin(_dbapi_conn: Any, record: Any) -> None:
    record.info["checked_in"] = time.monotonic()


def _ping_if_idle(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    if time.monotonic() - record.info.get("checked_in", 0.0) < IDLE_BEFORE_PING_SECONDS:
        return
    try:
        dbapi_conn.ping()
    except Exception as exc:
        raise DisconnectionError(f"a pooled connection is gone: {type(exc).__name__}") from exc


def dialect_of(session: AsyncSession) -> str:
    """ "sqlite" or "postgresql": the database this session talks to."""
    return session.get_bind().dialect.name


def rowcount(result: object) -> int:
    """Rows an UPDATE or DELETE matched. SQLAlchemy types `execute()` as a plain `Result`; for DML it
    is a `CursorResult`, which has the count."""
    assert isinstance(result, CursorResult), f"not the result of an UPDATE/DELETE: {result!r}"
    return result.rowcount


def database_unreachable(exc: BaseException) -> bool:
    """True when `exc` says the database cannot be reached now (refused, dropped, shutting down,
    starting up, pool exhausted), rather than that a statement is wrong: worth retrying later."""
    import sqlalchemy.exc as sa

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sa.DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, OSError | TimeoutError | sa.DisconnectionError | sa.TimeoutError):
            return True
        if _is_asyncpg_outage(current):
            return True
        if isinstance(current, sa.InterfaceError | sa.OperationalError):
            # SQLite's "database is locked"; asyncpg's errors arrive wrapped, checked through `orig`.
            return current.orig is None or database_unreachable(current.orig) or "locked" in str(current)
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
    return False


def _is_asyncpg_outage(exc: BaseException) -> bool:
    try:
        import asyncpg.exceptions as pg
    except ImportError:  # SQLite-only installs
        return False
    outage = (pg.PostgresConnectionError, pg.OperatorInterventionError, pg.InterfaceError)
    return isinstance(exc, outage) and not isinstance(exc, pg.QueryCanceledError)
