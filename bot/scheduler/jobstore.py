"""APScheduler's `SQLAlchemyJobStore` on the store's own database, through a synchronous engine.

The job store is only used from the scheduler's own thread (`bot.scheduler.threaded`), so on SQLite
its writes wait for the async store's transactions like any other writer, without blocking the loop.
A write of a job's next run time that still fails (a long lock, another process removed the job) is
logged and retried at the next wake-up instead of stopping the scheduler; running an occurrence twice
is harmless, since `scheduled_runs.run_key` lets it run once.
"""

from __future__ import annotations

import logging
from typing import Any

from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from bot.store.engine import sync_url

log = logging.getLogger(__name__)

TABLE = "apscheduler_jobs"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def job_store_engine(url: str) -> Engine:
    """A synchronous engine on the database at `url` (the async store's URL)."""
    sync = sync_url(url)
    if sync.startswith("sqlite"):
        engine = create_engine(sync)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(sync, pool_pre_ping=True, pool_size=2, max_overflow=2)


class SharedJobStore(SQLAlchemyJobStore):
    """The job store, tolerant of a write losing to another process or to a busy SQLite."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine=engine, tablename=TABLE)

    def update_job(self, job: Any) -> None:
        try:
            super().update_job(job)
        except JobLookupError:
            log.info("scheduled job %s was removed by another process; not updating it", job.id)
        except SQLAlchemyError as exc:
            log.warning("could not save the next run of %s (%s); retrying later", job.id, type(exc).__name__)
