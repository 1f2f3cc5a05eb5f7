"""Periodic work: retention, scheduled posts and retraining, on APScheduler; `scheduled_runs` makes each run once."""

from bot.scheduler.errors import ScheduleError
from bot.scheduler.jobs import JobDef, JobProblem, plan_jobs
from bot.scheduler.service import JobScheduler, RunResult

__all__ = ["JobDef", "JobProblem", "JobScheduler", "RunResult", "ScheduleError", "plan_jobs"]
