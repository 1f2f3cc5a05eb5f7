"""Occurrences of scheduled jobs as rows of `scheduled_runs`: who runs each one, and how it went.

Several processes may fire the same occurrence (each runs its own APScheduler on the same plan). The
unique `run_key` decides: `INSERT ... ON CONFLICT DO NOTHING` succeeds for exactly one of them, and
only that process runs the job. A row left `running` by a process that died is taken over by the next
process that fires or recovers that occurrence, with a compare-and-set `UPDATE`, so again one wins.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import utcnow
from bot.store.conversations import _insert_for
from bot.store.engine import rowcount
from bot.store.models import ScheduledRun

# ok: done; skipped: nothing to do, with the reason (e.g. too little data); error: failed, with why;
# interrupted: stopped by a shutdown before it finished.
STATUSES = ("running", "ok", "skipped", "error", "interrupted")


def process_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def run_key(job_id: str, scheduled_for: datetime) -> str:
    """`<job id>@<occurrence in UTC, ISO 8601>`: the same in every process for the same occurrence."""
    return f"{job_id}@{scheduled_for.astimezone(UTC).isoformat()}"


@dataclass(frozen=True)
class RunRecord:
    id: int
    run_key: str
    job_id: str
    scheduled_for: datetime
    status: str
    owner: str
    detail: dict[str, Any]
    error: str | None
    started_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, row: ScheduledRun) -> RunRecord:
        return cls(
            row.id,
            row.run_key,
            row.job_id,
            row.scheduled_for,
            row.status,
            row.owner,
            dict(row.detail or {}),
            row.error,
            row.started_at,
            row.finished_at,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "scheduled_for": self.scheduled_for.isoformat(),
            "status": self.status,
            "owner": self.owner,
            "detail": self.detail,
            "error": self.error,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
        }


def owner_is_dead(owner: str) -> bool:
    """True when `owner` (`host:pid`) was a process on this host that no longer runs."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


async def claim(
    session: AsyncSession,
    job_id: str,
    scheduled_for: datetime,
    *,
    owner: str,
    stale_after: timedelta,
    key: str | None = None,
) -> int | None:
    """Take the occurrence: the new row's id, or None when another process has it (or had it)."""
    key = key or run_key(job_id, scheduled_for)
    now = utcnow()
    inserted = (
        await session.execute(
            _insert_for(session)(ScheduledRun)
            .values(
                run_key=key,
                job_id=job_id,
                scheduled_for=scheduled_for,
                status="running",
                owner=owner,
                detail={},
                started_at=now,
            )
            .on_conflict_do_nothing(index_elements=["run_key"])
            .returning(ScheduledRun.id)
        )
    ).scalar_one_or_none()
    if inserted is not None:
        return inserted
    existing = (await session.execute(select(ScheduledRun).where(ScheduledRun.run_key == key))).scalar_one()
    abandoned = existing.status == "interrupted" or (
        existing.status == "running"
        and (owner_is_dead(existing.owner) or existing.started_at < now - stale_after)
    )
    if not abandoned:
        return None
    # Compare-and-set on what we read: of two processes taking over at once, one updates the row.
    taken = await session.execute(
        update(ScheduledRun)
        .where(
            ScheduledRun.id == existing.id,
            ScheduledRun.status == existing.status,
            ScheduledRun.owner == existing.owner,
            ScheduledRun.started_at == existing.started_at,
        )
        .values(status="running", owner=owner, started_at=now, finished_at=None, error=None)
    )
    return existing.id if rowcount(taken) == 1 else None


async def finish(
    session: AsyncSession,
    run_id: int,
    *,
    status: str,
    detail: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    assert status in STATUSES
    await session.execute(
        update(ScheduledRun)
        .where(ScheduledRun.id == run_id)
        .values(
            status=status, detail=detail or {}, error=error[:4000] if error else None, finished_at=utcnow()
        )
    )


PROBLEM_MARK = "@problem:"


async def clear_problems(session: AsyncSession) -> None:
    """Forget the problems recorded at the last start (they are recorded again if still there)."""
    await session.execute(delete(ScheduledRun).where(ScheduledRun.run_key.contains(PROBLEM_MARK)))


async def record_problem(session: AsyncSession, job_id: str, message: str, *, owner: str) -> None:
    """A job that cannot even be scheduled (bad cron, unknown persona): an `error` row `status` shows.

    One row per distinct problem; seeing it again (a restart) moves it to now rather than adding rows.
    """
    digest = hashlib.sha256(message.encode()).hexdigest()[:16]
    key = f"{job_id}{PROBLEM_MARK}{digest}"
    now = utcnow()
    await session.execute(delete(ScheduledRun).where(ScheduledRun.run_key == key))
    await session.execute(
        _insert_for(session)(ScheduledRun)
        .values(
            run_key=key,
            job_id=job_id,
            scheduled_for=now,
            status="error",
            owner=owner,
            detail={"problem": True},
            error=message[:4000],
            started_at=now,
            finished_at=now,
        )
        .on_conflict_do_nothing(index_elements=["run_key"])
    )


async def prune(session: AsyncSession, *, before: datetime, job_id: str | None = None) -> int:
    """Delete finished runs started before `before` (of `job_id`, or of every job); each job's newest
    run is kept, so `personabot status` and the catch-up after downtime still see when it last ran."""
    newest = select(func.max(ScheduledRun.id)).group_by(ScheduledRun.job_id)
    query = delete(ScheduledRun).where(
        ScheduledRun.started_at < before, ScheduledRun.status != "running", ScheduledRun.id.not_in(newest)
    )
    if job_id is not None:
        query = query.where(ScheduledRun.job_id == job_id)
    return rowcount(await session.execute(query))


async def last_runs(session: AsyncSession) -> dict[str, RunRecord]:
    """The newest run (or recorded problem) of every job id, by start time."""
    newest = (
        select(ScheduledRun.job_id, func.max(ScheduledRun.started_at).label("started"))
        .group_by(ScheduledRun.job_id)
        .subquery()
    )
    rows = await session.execute(
        select(ScheduledRun)
        .join(
            newest, (newest.c.job_id == ScheduledRun.job_id) & (newest.c.started == ScheduledRun.started_at)
        )
        .order_by(ScheduledRun.job_id, ScheduledRun.id)
    )
    return {row.job_id: RunRecord.of(row) for row in rows.scalars()}


async def recent_runs(session: AsyncSession, *, job_prefix: str, limit: int = 20) -> list[RunRecord]:
    """The newest runs of the jobs whose id starts with `job_prefix` (e.g. `retrain:`), newest first."""
    rows = await session.execute(
        select(ScheduledRun)
        .where(ScheduledRun.job_id.startswith(job_prefix, autoescape=True))
        .order_by(ScheduledRun.started_at.desc(), ScheduledRun.id.desc())
        .limit(limit)
    )
    return [RunRecord.of(row) for row in rows.scalars()]


async def last_run(
    session: AsyncSession, job_id: str, *, status: str | None = None, problems: bool = True
) -> RunRecord | None:
    """The job's newest run; `problems=False` leaves out recorded config problems (not runs at all)."""
    query = select(ScheduledRun).where(ScheduledRun.job_id == job_id)
    if not problems:
        query = query.where(~ScheduledRun.run_key.contains(PROBLEM_MARK))
    if status is not None:
        query = query.where(ScheduledRun.status == status)
    row = (
        await session.execute(query.order_by(ScheduledRun.started_at.desc(), ScheduledRun.id.desc()).limit(1))
    ).scalar_one_or_none()
    return RunRecord.of(row) if row is not None else None


async def abandoned_runs(
    session: AsyncSession, *, since: datetime, stale_after: timedelta
) -> list[RunRecord]:
    """Occurrences since `since` whose process stopped before finishing them (for recovery on start)."""
    now = utcnow()
    rows = await session.execute(
        select(ScheduledRun)
        .where(ScheduledRun.status.in_(("running", "interrupted")), ScheduledRun.scheduled_for >= since)
        .order_by(ScheduledRun.scheduled_for)
    )
    found = []
    for row in rows.scalars():
        if row.status == "interrupted" or owner_is_dead(row.owner) or row.started_at < now - stale_after:
            found.append(RunRecord.of(row))
    return found
