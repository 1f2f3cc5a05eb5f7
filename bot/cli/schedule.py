"""`personabot schedule list | run JOB_ID`: the scheduled jobs, and running one by hand."""

from __future__ import annotations

import argparse
import json
from typing import Any

from bot.cli.common import run_async, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="scheduled jobs: list them, run one now")
    schedule = p.add_subparsers(dest="schedule_command", metavar="ACTION", required=True)
    ls = schedule.add_parser("list", help="every job, its trigger, next and last run, and config problems")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=_list)
    run = schedule.add_parser("run", help="run one job now, in this process (e.g. retention, retrain:pirate)")
    run.add_argument("job_id", metavar="JOB_ID")
    run.add_argument(
        "--force", action="store_true", help="retrain even below scheduler.retrain_min_conversations"
    )
    run.set_defaults(func=_run)


async def _jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    from datetime import UTC

    from bot.events import utcnow
    from bot.runtime import load_registry, open_store
    from bot.scheduler import plan_jobs, runs

    settings = settings_from(args)
    defs, problems = plan_jobs(settings, load_registry(settings))
    store = await open_store(settings)
    try:
        async with store.transaction() as session:
            last = await runs.last_runs(session)
    finally:
        await store.close()

    now = utcnow()
    listed = []
    for job in defs:
        nxt = job.trigger.get_next_fire_time(None, now)  # the same in every process
        run = last.get(job.id)
        listed.append(
            {
                "job_id": job.id,
                "kind": job.kind,
                "description": job.description,
                "trigger": str(job.trigger),
                "next_run": nxt.astimezone(UTC).isoformat() if nxt else None,
                "last_run": run.as_dict() if run else None,
                "problem": None,
            }
        )
    for problem in problems:
        listed.append(
            {
                "job_id": problem.job_id,
                "kind": problem.job_id.split(":", 1)[0],
                "description": "not scheduled",
                "trigger": None,
                "next_run": None,
                "last_run": None,
                "problem": problem.message,
            }
        )
    return listed


def _list(args: argparse.Namespace) -> int:
    from bot.status import run_line

    jobs = run_async(_jobs(args))
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    if not jobs:
        print(
            "no scheduled jobs (set scheduler.retention_days, add [[schedule]] to a persona, or enable retrain)"
        )
    for job in jobs:
        if job["problem"]:
            print(f"{job['job_id']}: NOT SCHEDULED: {job['problem']}")
            continue
        nxt = job["next_run"][:19].replace("T", " ") if job["next_run"] else "-"
        last = run_line(job["last_run"]) if job["last_run"] else "never run"
        print(
            f"{job['job_id']}: {job['description']}\n  trigger {job['trigger']}; next {nxt} UTC\n  last: {last}"
        )
    return 1 if any(j["problem"] for j in jobs) else 0


def _run(args: argparse.Namespace) -> int:
    from bot.runtime import load_registry, open_store
    from bot.scheduler import JobScheduler

    settings = settings_from(args)
    registry = load_registry(settings)

    async def go() -> Any:
        store = await open_store(settings)
        try:
            return await JobScheduler(settings, store, registry).run_now(args.job_id, force=args.force)
        finally:
            await store.close()

    result = run_async(go())
    print(f"{result.job_id}: {result.status}: {result.summary}")
    return 0 if result.status in ("ok", "skipped") else 1
