"""The scheduler: APScheduler 3.x (`AsyncIOScheduler`) with its jobs in memory, one per process.

Every process that runs a scheduler (`personabot run`, more than one on PostgreSQL) plans the same jobs
from the config and fires them when due; interval jobs are aligned to one anchor and cron jobs to the
clock, so all of them compute the same occurrences. The database, not the job store, is what they
share: which process does the work of one occurrence is decided by the unique run key in
`scheduled_runs` (see `bot.scheduler.runs`), and the others skip it. On start, a process runs each
job's latest occurrence missed while no process ran (when the job has run before and the occurrence
is at most `scheduler.misfire_grace_seconds` old), and finishes occurrences a stopped or crashed
process left unfinished. APScheduler is used through its public API and its documented extension
point for custom executors (`bot.scheduler.executor`), with a memory job store in each process, as its
FAQ asks of several processes; `scheduled_runs` rows older than `scheduler.run_history_days` are pruned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from bot.config import Settings
from bot.errors import PersonabotError
from bot.events import utcnow
from bot.export import exports_dir, scrub_exports
from bot.scheduler import runs
from bot.scheduler.errors import ScheduleError
from bot.scheduler.executor import OccurrenceExecutor, scheduled_job
from bot.scheduler.jobs import JobDef, JobOutcome, latest_fire, plan_jobs
from bot.scheduler.posts import queue_post
from bot.scheduler.retention import prune
from bot.scheduler.retrain import Retrainer
from bot.store import Store
from personas.registry import PersonaRegistry

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RunResult:
    """How one occurrence went in this process."""

    job_id: str
    scheduled_for: datetime
    status: str  # ok | skipped | error | interrupted | taken (another process has or had it)
    summary: str
    detail: dict[str, Any] = field(default_factory=dict)


class JobScheduler:
    """Plans and fires the scheduled jobs of one process."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: PersonaRegistry,
        *,
        owner: str | None = None,
        retrainer: Retrainer | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.owner = owner or runs.process_owner()
        self.jobs, self.problems = plan_jobs(settings, registry)
        self.by_id = {job.id: job for job in self.jobs}
        self.retrainer = retrainer or Retrainer(settings, store, registry)
        self._aps: AsyncIOScheduler | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- lifecycle --------------------------------------------------------------------------------

    @property
    def grace(self) -> timedelta:
        return timedelta(seconds=self.settings.scheduler.misfire_grace_seconds)

    @property
    def history(self) -> timedelta:
        """How long a finished occurrence's row is kept in `scheduled_runs`."""
        return timedelta(days=self.settings.scheduler.run_history_days)

    async def start(self) -> None:
        """Record the plan's problems, prune old runs, catch up and recover, start firing."""
        async with self.store.transaction() as session:
            await runs.clear_problems(session)
            for problem in self.problems:
                log.error("scheduler: %s: %s", problem.job_id, problem.message)
                await runs.record_problem(session, problem.job_id, problem.message, owner=self.owner)
            pruned = await runs.prune(session, before=utcnow() - self.history)
        if pruned:
            log.info("scheduler: pruned %d run record(s) older than %s", pruned, self.history)
        self._aps = AsyncIOScheduler(
            timezone=UTC,
            executors={"default": OccurrenceExecutor(self.run_occurrence, self.spawn)},
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": max(1, int(self.grace.total_seconds())),
            },
        )
        # Paused, jobs get their next run time but none fires until the catch-up has been decided.
        self._aps.start(paused=True)
        now = utcnow()
        for job in self.jobs:
            self._aps.add_job(scheduled_job, trigger=job.trigger, id=job.id, name=job.description)
        await self._catch_up(now)
        await self._recover()
        self._aps.resume()

    async def _catch_up(self, now: datetime) -> None:
        """Run each job's latest occurrence that fell due while no process ran, if within the grace.

        A job that never ran before (new in the config) starts with its next occurrence instead, so a
        first start at 09:05 does not post the 09:00 greeting.
        """
        assert self._aps is not None
        upcoming = {job.id: job.next_run_time for job in self._aps.get_jobs()}
        for job in self.jobs:
            missed = latest_fire(job.trigger, now - self.grace, upcoming.get(job.id) or now)
            if missed is None:
                continue
            async with self.store.transaction() as session:
                last = await runs.last_run(session, job.id, problems=False)
            if last is None or last.scheduled_for >= missed:
                continue  # new job, or that occurrence is recorded (the claim would refuse it anyway)
            log.info("scheduler: catching up %s of %s, missed while nothing ran", job.id, missed.isoformat())
            self.spawn(self.run_occurrence(job.id, missed))

    def _stale_after(self, job: JobDef | None) -> timedelta:
        """How long a `running` row of another host counts as alive (same host: its pid is checked)."""
        if job is not None and job.kind == "retrain":
            return timedelta(hours=self.settings.scheduler.retrain_timeout_hours + 1)
        return max(self.grace, timedelta(minutes=10))

    async def _recover(self) -> None:
        """Finish occurrences a stopped process left half done; report abandoned retrains."""
        now = utcnow()
        async with self.store.transaction() as session:
            abandoned = await runs.abandoned_runs(
                session, since=datetime.min.replace(tzinfo=UTC), stale_after=self._stale_after(None)
            )
        for run in abandoned:
            job = self.by_id.get(run.job_id)
            if job is not None and job.kind != "retrain" and run.scheduled_for >= now - self.grace:
                log.info(
                    "scheduler: finishing %s of %s, left unfinished by %s",
                    run.job_id,
                    run.scheduled_for.isoformat(),
                    run.owner,
                )
                self.spawn(self.run_occurrence(run.job_id, run.scheduled_for))
                continue
            if (
                job is not None
                and job.kind == "retrain"
                and run.status == "running"
                and not runs.owner_is_dead(run.owner)
            ):
                if run.started_at >= now - self._stale_after(job):
                    continue  # maybe still training on another host
            async with self.store.transaction() as session:
                await runs.finish(
                    session,
                    run.id,
                    status="error",
                    detail=run.detail,
                    error=f"interrupted: the process running it ({run.owner}) stopped before it finished",
                )

    def spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` as a task that `stop()` waits for."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_idle(self) -> None:
        """Wait until every occurrence started so far (fired or recovered) has finished."""
        while pending := [t for t in self._tasks if not t.done()]:
            await asyncio.wait(pending)

    async def stop(self, timeout: float = 30.0) -> None:
        """Fire nothing more; give running jobs `timeout` seconds, then interrupt them."""
        aps, self._aps = self._aps, None
        if aps is not None and aps.running:
            aps.pause()  # at once: the shutdown itself runs on a later turn of the loop
            aps.shutdown(wait=False)
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    # -- running one occurrence -------------------------------------------------------------------

    def _unknown(self, job_id: str) -> str:
        problem = next((p for p in self.problems if p.job_id == job_id), None)
        if problem is not None:
            return problem.message
        known = ", ".join(sorted(self.by_id)) or "none"
        if job_id == "retention":
            why = "retention is off: set scheduler.retention_days or scheduler.retention_channels"
        elif job_id.startswith("retrain:") and not self.settings.scheduler.retrain:
            why = "retraining is off: scheduler.retrain is false"
        else:
            why = "no such persona or config entry"
        return f"unknown scheduled job {job_id!r} ({why}); jobs: {known}"

    async def run_occurrence(
        self, job_id: str, scheduled_for: datetime, *, manual: bool = False, force: bool = False
    ) -> RunResult:
        """Run the occurrence unless another process has it; failures are recorded, never raised."""
        job = self.by_id.get(job_id)
        key = f"{job_id}@manual:{utcnow().isoformat()}" if manual else runs.run_key(job_id, scheduled_for)
        async with self.store.transaction() as session:
            run_id = await runs.claim(
                session, job_id, scheduled_for, owner=self.owner, stale_after=self._stale_after(job), key=key
            )
        if run_id is None:
            log.info("scheduler: %s of %s is run by another process", job_id, scheduled_for.isoformat())
            return RunResult(job_id, scheduled_for, "taken", "run by another process")
        try:
            if job is None:
                raise ScheduleError(self._unknown(job_id))
            outcome = await self._execute(job, scheduled_for, force=force)
        except asyncio.CancelledError:
            async with self.store.transaction() as session:
                await runs.finish(session, run_id, status="interrupted", error="interrupted by a shutdown")
            raise
        except Exception as exc:
            if isinstance(exc, PersonabotError):
                message = str(exc)
                log.error("scheduler: %s failed: %s", job_id, message)
            else:
                message = f"{type(exc).__name__}: {exc}"
                log.exception("scheduler: %s failed", job_id)
            await self._finish(job_id, run_id, status="error", error=message)
            return RunResult(job_id, scheduled_for, "error", message)
        detail = outcome.detail | {"summary": outcome.summary}
        await self._finish(job_id, run_id, status=outcome.status, detail=detail)
        log.info("scheduler: %s: %s", job_id, outcome.summary)
        return RunResult(job_id, scheduled_for, outcome.status, outcome.summary, detail)

    async def _finish(self, job_id: str, run_id: int, **outcome: Any) -> None:
        async with self.store.transaction() as session:
            await runs.finish(session, run_id, **outcome)
            # Each job trims its own history as it runs; `start` trims jobs no longer configured.
            await runs.prune(session, before=utcnow() - self.history, job_id=job_id)

    async def _execute(self, job: JobDef, scheduled_for: datetime, *, force: bool) -> JobOutcome:
        if job.kind == "retention":
            detail = await prune(self.store, self.settings.scheduler, scheduled_for)
            detail["scrubbed_export_lines"] = await scrub_exports(
                self.store, exports_dir(self.settings.data_dir)
            )
            return JobOutcome("ok", detail, f"deleted {detail['deleted_messages']} message(s)")
        if job.kind == "post":
            assert job.post is not None
            detail = await queue_post(self.store, self.registry, job.post, scheduled_for)
            if "reason" in detail:
                return JobOutcome("skipped", detail, detail["reason"])
            summary = f"queued a post in {len(detail['queued'])} channel(s)"
            if detail["already_queued"]:
                summary += f", {len(detail['already_queued'])} already queued"
            return JobOutcome("ok", detail, summary)
        assert job.persona is not None
        return await self.retrainer.run(job.persona, scheduled_for, force=force)

    async def run_now(self, job_id: str, *, force: bool = False) -> RunResult:
        """`personabot schedule run JOB_ID`: one extra run now, whatever the schedule says."""
        if job_id not in self.by_id:
            raise ScheduleError(self._unknown(job_id))
        return await self.run_occurrence(job_id, utcnow(), manual=True, force=force)

    async def next_run_times(self) -> dict[str, datetime | None]:
        """Next fire time of each job (the scheduler must be started)."""
        assert self._aps is not None
        return {job.id: job.next_run_time for job in self._aps.get_jobs()}
