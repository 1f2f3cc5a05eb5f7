"""An APScheduler executor that hands each due occurrence, with its scheduled time, to a runner.

APScheduler's own executors call the job's function without the time it was due, but the run key and
a post's dedupe key are built from exactly that time. A custom executor is APScheduler 3's extension
point for how jobs run ("Extending APScheduler: custom executors"): `_do_submit_job` is the one method
a `BaseExecutor` subclass implements, and it receives the due run times; `_run_job_success` and
`_run_job_error` are how it reports back. The runner is passed in as plain callables, so this module
knows nothing of `bot.scheduler.service`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from apscheduler.events import EVENT_JOB_EXECUTED, EVENT_JOB_MISSED, JobExecutionEvent
from apscheduler.executors.base import BaseExecutor
from apscheduler.job import Job

log = logging.getLogger(__name__)

# The one job store: each process keeps its jobs in memory (APScheduler's default store).
JOBSTORE = "default"

RunOccurrence = Callable[[str, datetime], Awaitable[object]]
Spawn = Callable[[Coroutine[Any, Any, list[JobExecutionEvent]]], "asyncio.Task[list[JobExecutionEvent]]"]


async def scheduled_job() -> None:
    """What every job names as its function; `OccurrenceExecutor` runs the occurrence instead."""
    raise RuntimeError("personabot's scheduled jobs run through bot.scheduler.executor.OccurrenceExecutor")


class OccurrenceExecutor(BaseExecutor):
    """Runs `run(job_id, scheduled_for)` for each due run time, as a task made by `spawn`."""

    def __init__(self, run: RunOccurrence, spawn: Spawn) -> None:
        super().__init__()
        self._run = run
        self._spawn = spawn

    def _do_submit_job(self, job: Job, run_times: list[datetime]) -> None:
        # Called on the event loop (AsyncIOScheduler processes due jobs there; the job store is memory).
        task = self._spawn(self._run_due(job.id, job.misfire_grace_time, list(run_times)))
        task.add_done_callback(partial(self._finished, job.id))

    def _finished(self, job_id: str, task: asyncio.Task[list[JobExecutionEvent]]) -> None:
        # Either call releases the job's instance slot (`max_instances`), so the next occurrence can run.
        if task.cancelled():
            self._run_job_success(job_id, [])
            return
        exc = task.exception()
        if exc is not None:
            self._run_job_error(job_id, exc, exc.__traceback__)
        else:
            self._run_job_success(job_id, task.result())

    async def _run_due(
        self, job_id: str, grace: float | None, run_times: list[datetime]
    ) -> list[JobExecutionEvent]:
        events = []
        for run_time in run_times:
            late = datetime.now(UTC) - run_time
            if grace is not None and late > timedelta(seconds=grace):
                log.warning("%s: the run at %s was missed by %s; skipped", job_id, run_time.isoformat(), late)
                events.append(JobExecutionEvent(EVENT_JOB_MISSED, job_id, JOBSTORE, run_time))
                continue
            await self._run(job_id, run_time)  # records its own failures; never raises but on cancel
            events.append(JobExecutionEvent(EVENT_JOB_EXECUTED, job_id, JOBSTORE, run_time))
        return events
