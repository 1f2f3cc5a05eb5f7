"""An APScheduler executor that hands each due occurrence, with its scheduled time, to the runner.

APScheduler's own executors call the stored function without the time it was scheduled for, but the
run key and a post's dedupe key are built from exactly that time. Jobs in the store only carry their
id and trigger; this executor looks the job up in the process's `JobScheduler` by id, so the store
never holds a pickled reference to one process's objects.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.base import BaseExecutor

from bot.scheduler.threaded import submit_on_loop

T = TypeVar("T")


class OccurrenceRunner(Protocol):
    """What the executor needs of `bot.scheduler.service.JobScheduler` (declared here, so the two
    modules do not import each other)."""

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]: ...

    async def run_occurrence(self, job_id: str, scheduled_for: datetime) -> object: ...


log = logging.getLogger(__name__)


async def scheduled_job(**_: Any) -> None:
    """What the job store names as every job's function; `OccurrenceExecutor` runs the job instead."""
    raise RuntimeError("personabot's scheduled jobs run through bot.scheduler.executor.OccurrenceExecutor")


class OccurrenceExecutor(BaseExecutor):
    def __init__(self, runner: OccurrenceRunner) -> None:
        super().__init__()
        self._runner = runner
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, scheduler: Any, alias: str) -> None:
        super().start(scheduler, alias)
        self._loop = scheduler._eventloop

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        # Called in the scheduler's thread (see bot.scheduler.threaded); the job runs on the loop.
        assert self._loop is not None
        args = (job.id, job._jobstore_alias, job.misfire_grace_time, list(run_times))
        submit_on_loop(self._loop, lambda: self._begin(*args))

    def _begin(self, job_id: str, alias: str, grace: float | None, run_times: list[datetime]) -> None:
        task = self._runner.spawn(self._run(job_id, alias, grace, run_times))

        def done(t: asyncio.Task[list[JobExecutionEvent]]) -> None:
            if t.cancelled():
                self._run_job_success(job_id, [])
                return
            exc = t.exception()
            if exc is not None:
                self._run_job_error(job_id, exc, exc.__traceback__)
            else:
                self._run_job_success(job_id, t.result())

        task.add_done_callback(done)

    async def _run(
        self, job_id: str, alias: str, grace: float | None, run_times: list[datetime]
    ) -> list[JobExecutionEvent]:
        events = []
        for run_time in run_times:
            late = datetime.now(UTC) - run_time
            if grace is not None and late > timedelta(seconds=grace):
                log.warning("%s: the run at %s was missed by %s; skipped", job_id, run_time.isoformat(), late)
                events.append(JobExecutionEvent(EVENT_JOB_MISSED, job_id, alias, run_time))
                continue
            try:
                await self._runner.run_occurrence(job_id, run_time)
            except Exception:
                events.append(
                    JobExecutionEvent(EVENT_JOB_ERROR, job_id, alias, run_time, exception=sys.exc_info()[1])
                )
            else:
                events.append(JobExecutionEvent(EVENT_JOB_EXECUTED, job_id, alias, run_time))
        return events
