"""SQLite for SQLAlchemy's asyncio API without a thread: each statement runs in the event loop's thread.

aiosqlite runs every driver call (open a cursor, execute, fetch, close, commit) in its own thread and
hands the result back through the event loop: about four hops per statement, which cost more CPU than
the SQLite work itself for the bot's short statements (about 210 against 60 microseconds of CPU per
one-row SELECT, measured with SQLAlchemy on top of each). Here those calls run inline; a statement
blocks the loop only as long as SQLite takes to run it.

What must never block the loop is waiting for another connection's write lock: the connection is
opened with SQLite's busy timeout at 0, and a statement that finds the database locked sleeps
asynchronously (1 ms, doubling to 50 ms) and tries again until `busy_timeout_s` has passed, then
raises SQLite's "database is locked". So a second connection of the same process that wants to write
waits without stopping the first one from committing, and another process's writer is waited for the
same way.

URLs: `sqlite:///PATH` uses this driver (`sqlite+inline`); `sqlite+aiosqlite:///PATH` keeps aiosqlite's
thread, for stores whose queries are long enough that running them in the loop would hold up the bot.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import util
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_dbapi,
    SQLiteDialect_aiosqlite,
)
from sqlalchemy.util.concurrency import await_

T = TypeVar("T")

BUSY_TIMEOUT_S = 30.0
# SQLite's primary code SQLITE_BUSY and its extended forms worth waiting out. SQLITE_BUSY_SNAPSHOT
# (517) is not among them: that transaction's snapshot is stale and only starting over helps.
_WAITABLE = {5, 5 | (1 << 8), 5 | (3 << 8)}  # BUSY, BUSY_RECOVERY, BUSY_TIMEOUT


def _locked(error: sqlite3.OperationalError) -> bool:
    return getattr(error, "sqlite_errorcode", None) in _WAITABLE


async def _run(call: Callable[..., T], *args: Any, busy_timeout_s: float) -> T:
    """`call(*args)`, retried with asynchronous sleeps while the database is locked."""
    deadline: float | None = None
    pause = 0.001
    while True:
        try:
            return call(*args)
        except sqlite3.OperationalError as error:
            if not _locked(error):
                raise
            now = time.monotonic()
            deadline = deadline if deadline is not None else now + busy_timeout_s
            if now >= deadline:
                raise
            await asyncio.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.05)


class InlineCursor:
    """The async cursor SQLAlchemy's adapter drives, over a plain `sqlite3.Cursor`."""

    def __init__(self, connection: InlineConnection) -> None:
        self._connection = connection
        self._cursor = connection._conn.cursor()

    async def __aenter__(self) -> InlineCursor:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Any = ()) -> InlineCursor:
        await _run(self._cursor.execute, sql, parameters, busy_timeout_s=self._connection.busy_timeout_s)
        return self

    async def executemany(self, sql: str, parameters: Any) -> InlineCursor:
        await _run(self._cursor.executemany, sql, parameters, busy_timeout_s=self._connection.busy_timeout_s)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(self._cursor.arraysize if size is None else size)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    async def setinputsizes(self, *_sizes: Any) -> None:
        return None


class InlineConnection:
    """The async connection SQLAlchemy's aiosqlite adapter expects, over a plain `sqlite3.Connection`."""

    def __init__(self, conn: sqlite3.Connection, busy_timeout_s: float) -> None:
        self._conn = conn
        self.busy_timeout_s = busy_timeout_s

    @property
    def _connection(self) -> sqlite3.Connection | None:  # the adapter's "still open?" check
        return self._conn

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> InlineCursor:
        return InlineCursor(self)

    async def execute(self, sql: str, parameters: Any = ()) -> InlineCursor:
        return await InlineCursor(self).execute(sql, parameters)

    async def commit(self) -> None:
        # A COMMIT that finds readers still finishing can be BUSY; SQLite keeps the transaction open
        # for another try.
        await _run(self._conn.commit, busy_timeout_s=self.busy_timeout_s)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    def stop(self) -> None:  # the adapter's "terminate": nothing runs elsewhere, so just close
        self._conn.close()


async def connect(
    database: str, *, busy_timeout_s: float = BUSY_TIMEOUT_S, **kwargs: Any
) -> InlineConnection:
    """Open `database`; SQLite's own busy wait is off (see the module's docstring)."""
    kwargs.pop("timeout", None)
    kwargs.setdefault("check_same_thread", False)  # the pool may close it from a garbage collection
    return InlineConnection(sqlite3.connect(database, timeout=0, **kwargs), busy_timeout_s)


class _Driver:
    """The module-shaped object SQLAlchemy's aiosqlite adapter reads exceptions and `connect` from."""

    connect = staticmethod(connect)
    Connection = InlineConnection

    def __getattr__(self, name: str) -> Any:  # Error, OperationalError, sqlite_version, ...
        return getattr(sqlite3, name)


class _AdaptedConnection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()

    @property
    def isolation_level(self) -> str | None:
        return self._connection.isolation_level  # type: ignore[no-any-return]

    @isolation_level.setter
    def isolation_level(self, value: str | None) -> None:
        # aiosqlite's version queues this onto its thread; there is no thread here.
        self._connection._conn.isolation_level = value


class _DBAPI(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *args: Any, **kwargs: Any) -> _AdaptedConnection:
        # InlineConnection has the members the adapter uses, not all of SQLAlchemy's protocol.
        return _AdaptedConnection(self, await_(connect(*args, **kwargs)))  # type: ignore[arg-type]


class SQLiteDialect_inline(SQLiteDialect_aiosqlite):
    driver = "inline"
    supports_statement_cache = True

    @classmethod
    def import_dbapi(cls) -> _DBAPI:
        return _DBAPI(_Driver(), sqlite3)  # type: ignore[arg-type]  # module-shaped, not a module

    def retrieve_dbapi_version(self, dbapi: Any) -> Sequence[int] | None:  # type: ignore[override]
        return util.parse_version_string(sqlite3.sqlite_version)


def register() -> None:
    """Make `sqlite+inline://` URLs resolve to this dialect."""
    from sqlalchemy.dialects import registry

    registry.register("sqlite.inline", __name__, "SQLiteDialect_inline")
