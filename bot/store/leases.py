"""One leased queue for every table the store uses as a queue (reply jobs, the outbox).

A row is *waiting* (due from `available_at`) or *leased*: `lease_owner` holds it until
`lease_expires_at`, and each claim adds one to `attempts`. Every write after the claim (renew, progress,
finish, retry, release) checks the holder — same owner *and* same attempt number — in its `WHERE`, so
a holder whose lease expired and was claimed again by someone else (or by itself, later) changes
nothing. Claiming is one `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING`: on
PostgreSQL many processes claim disjoint rows; on SQLite the statement runs under its one writer lock.

`keep_leases` renews the leases of rows still being worked on, so leases can be short (a dead holder's
rows are claimed again within one lease) while a slow but live holder keeps its rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import (
    BindParameter,
    ClauseElement,
    ColumnElement,
    Update,
    and_,
    bindparam,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import utcnow
from bot.store.engine import dialect_of, rowcount
from bot.store.models import table_of


class Transactions(Protocol):
    """What `keep_leases` needs of a `bot.store.Store` (named here: the package imports this module)."""

    def transaction(self) -> contextlib.AbstractAsyncContextManager[AsyncSession]: ...


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    """A claim on one row: valid while the row still names this owner and this attempt."""

    id: int
    owner: str
    attempt: int


class LeasedQueue:
    """Claim, renew and settle rows of `table` (a model with the lease columns) under a lease."""

    def __init__(self, table: Any, *, waiting: str, leased: str) -> None:
        self.table = table_of(table)  # Core statements: no ORM bookkeeping on these hot paths
        self.c = self.table.c
        self.waiting = waiting  # the status of a row waiting to be claimed
        self.leased = leased  # the status of a claimed row
        # `update_held` statements by the columns they set, built once (see `held_update`).
        self._held_updates: dict[tuple[str, ...], Update] = {}
        self._claims: dict[tuple[str, str], Update] = {}  # `claim` statements by dialect and shape

    def due(self, now: datetime | BindParameter[datetime]) -> ColumnElement[bool]:
        """Claimable now: waiting and due, or leased under a lease that has run out."""
        c = self.c
        return or_(
            and_(c.status == self.waiting, c.available_at <= now),
            and_(c.status == self.leased, c.lease_expires_at < now),
        )

    def held(self, lease: Lease) -> tuple[ColumnElement[bool], ...]:
        """The row is still leased under this very claim (not a later one, even by the same owner)."""
        c = self.c
        return (
            c.id == lease.id,
            c.status == self.leased,
            c.lease_owner == lease.owner,
            c.attempts == lease.attempt,
        )

    def held_update(self, columns: tuple[str, ...]) -> Update:
        """`UPDATE ... SET <columns> WHERE <held>` with bound parameters, built once per column set:
        building a statement costs more CPU than running it."""
        stmt = self._held_updates.get(columns)
        if stmt is None:
            c = self.c
            stmt = self._held_updates[columns] = (
                update(self.table)
                .where(*self.held_bound())
                .values({name: bindparam(f"v_{name}", type_=c[name].type) for name in columns})
            )
        return stmt

    def held_bound(self) -> tuple[ColumnElement[bool], ...]:
        """`held`, with the lease as bound parameters (`held_params` gives them), for statements built once."""
        c = self.c
        return (
            c.id == bindparam("held_id"),
            c.status == self.leased,
            c.lease_owner == bindparam("held_owner"),
            c.attempts == bindparam("held_attempt"),
        )

    async def claim(
        self,
        session: AsyncSession,
        *,
        shape: str,
        owner: str,
        limit: int,
        lease_seconds: float,
        where: Sequence[ColumnElement[bool]] = (),
        order_by: Sequence[Any] = (),
        values: dict[str, Any] | None = None,
        returning: Sequence[Any] = (),
        params: dict[str, Any] | None = None,
    ) -> list[tuple[Lease, tuple[Any, ...]]]:
        """Lease up to `limit` due rows matching `where`; returns each lease with its `returning` columns.

        The statement is built once per `shape` (a name the caller gives its `where`, `order_by`,
        `values` columns and `returning`): building it and its cache key cost more CPU than running
        it. So `where` must take its values from bound parameters, given in `params`, named unlike
        any column (an UPDATE takes a parameter named like a column as a value to SET)."""
        values = values or {}
        stmt = self.claim_sql(dialect_of(session), shape, where, order_by, tuple(values), returning)
        rows = await session.execute(stmt, self.claim_params(owner, limit, lease_seconds, values, params))
        claimed = [(Lease(row[0], owner, row[1]), tuple(row[2:])) for row in rows]
        return sorted(claimed, key=lambda c: c[0].id)

    @staticmethod
    def claim_params(
        owner: str,
        limit: int,
        lease_seconds: float,
        values: dict[str, Any],
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The parameters of a `claim_sql` statement."""
        now = utcnow()
        return {
            "claim_now": now,
            "claim_limit": limit,
            "claim_owner": owner,
            "claim_until": now + timedelta(seconds=lease_seconds),
            **{f"v_{name}": value for name, value in values.items()},
            **(params or {}),
        }

    def claim_sql(
        self,
        dialect: str,
        shape: str,
        where: Sequence[ColumnElement[bool]] = (),
        order_by: Sequence[Any] = (),
        value_names: tuple[str, ...] = (),
        returning: Sequence[Any] = (),
    ) -> Update:
        """`UPDATE ... WHERE id IN (SELECT the due rows ... FOR UPDATE SKIP LOCKED) RETURNING id,
        attempts, ...`, built once per dialect and `shape` (see `claim`)."""
        stmt = self._claims.get((dialect, shape))
        if stmt is None:
            stmt = self._claims[(dialect, shape)] = self._build_claim(
                dialect, where, order_by, value_names, returning
            )
        return stmt

    def _build_claim(
        self,
        dialect: str,
        where: Sequence[ColumnElement[bool]],
        order_by: Sequence[Any],
        value_names: tuple[str, ...],
        returning: Sequence[Any],
    ) -> Update:
        t, c = self.table, self.c
        now = bindparam("claim_now", type_=c.available_at.type)
        claimable = (
            select(c.id)
            .where(self.due(now), *where)
            .order_by(*order_by, c.id)
            .limit(bindparam("claim_limit"))
        )
        if dialect == "postgresql":
            claimable = claimable.with_for_update(skip_locked=True)
        return (
            update(t)
            .where(c.id.in_(claimable.scalar_subquery()))
            .values(
                status=self.leased,
                attempts=c.attempts + 1,
                lease_owner=bindparam("claim_owner", type_=c.lease_owner.type),
                lease_expires_at=bindparam("claim_until", type_=c.lease_expires_at.type),
                **{name: bindparam(f"v_{name}", type_=c[name].type) for name in value_names},
            )
            .returning(c.id, c.attempts, *returning)
        )

    async def renew(
        self, session: AsyncSession, leases: Iterable[Lease], *, lease_seconds: float
    ) -> set[int]:
        """Push the leases still held; returns the ids of those (a lost one is not renewed)."""
        until = utcnow() + timedelta(seconds=lease_seconds)
        held: set[int] = set()
        for lease in leases:
            if await self.update_held(session, lease, lease_expires_at=until):
                held.add(lease.id)
        return held

    async def update_held(self, session: AsyncSession, lease: Lease, **values: Any) -> bool:
        """Change a row only while the lease is held; False (nothing changed) once it is lost."""
        if any(isinstance(value, ClauseElement) for value in values.values()):
            result = await session.execute(update(self.table).where(*self.held(lease)).values(**values))
        else:
            result = await session.execute(
                self.held_update(tuple(sorted(values))), self.held_params(lease, values)
            )
        return rowcount(result) == 1

    @staticmethod
    def held_params(lease: Lease, values: dict[str, Any]) -> dict[str, Any]:
        """The parameters of a `held_update` statement setting `values` under `lease`."""
        params = {f"v_{name}": value for name, value in values.items()}
        params.update(held_id=lease.id, held_owner=lease.owner, held_attempt=lease.attempt)
        return params

    async def finish(self, session: AsyncSession, lease: Lease, status: str, **values: Any) -> bool:
        """Settle a held row for good (`status`: done, delivered, failed, ...) and drop its lease."""
        return await self.update_held(
            session, lease, status=status, lease_owner=None, lease_expires_at=None, **values
        )

    async def retry(self, session: AsyncSession, lease: Lease, *, after: float, **values: Any) -> bool:
        """Back to waiting, due again in `after` seconds (the attempt counts)."""
        return await self.update_held(
            session,
            lease,
            status=self.waiting,
            lease_owner=None,
            lease_expires_at=None,
            available_at=utcnow() + timedelta(seconds=after),
            **values,
        )

    async def release(self, session: AsyncSession, lease: Lease) -> bool:
        """Give a held row back at once (shutdown); the cut attempt is not counted."""
        return await self.update_held(
            session,
            lease,
            status=self.waiting,
            attempts=self.c.attempts - 1,
            lease_owner=None,
            lease_expires_at=None,
            available_at=utcnow(),
        )

    async def release_owner(self, session: AsyncSession, owner: str) -> int:
        """Give back every row `owner` still holds (a holder that was cut off); returns how many."""
        c = self.c
        result = await session.execute(
            update(self.table)
            .where(c.status == self.leased, c.lease_owner == owner)
            .values(
                status=self.waiting,
                attempts=c.attempts - 1,
                lease_owner=None,
                lease_expires_at=None,
                available_at=utcnow(),
            )
        )
        return rowcount(result)

    async def depth(self, session: AsyncSession, *where: ColumnElement[bool]) -> int:
        """Rows claimable now."""
        query = select(func.count(self.c.id)).where(self.due(utcnow()), *where)
        return int((await session.execute(query)).scalar_one())


@contextlib.asynccontextmanager
async def keep_leases(
    store: Transactions,
    queue: LeasedQueue,
    leases: Callable[[], Iterable[Lease]],
    *,
    lease_seconds: float,
) -> AsyncIterator[None]:
    """Renew the leases `leases()` names every third of a lease while the block runs.

    A renewal that fails (the database is briefly unreachable) is tried again at the next beat; the
    lease holds for two more beats. Writes after the block still check the holder, so a lease lost
    meanwhile is never acted on.
    """

    async def renew() -> None:
        while True:
            await asyncio.sleep(lease_seconds / 3)
            current = list(leases())
            if not current:
                continue
            try:
                async with store.transaction() as session:
                    await queue.renew(session, current, lease_seconds=lease_seconds)
            except Exception as exc:
                log.warning("could not renew %s leases: %s", queue.table.name, type(exc).__name__)

    task = asyncio.create_task(renew(), name=f"leases:{queue.table.name}")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
