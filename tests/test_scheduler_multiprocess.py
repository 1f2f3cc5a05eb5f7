"""Two scheduler processes on one PostgreSQL database never both run the same occurrence.

Each process runs a real `JobScheduler` (APScheduler on the shared job store) with retention due
every half second, and also fires the same 40 occurrences of a scheduled post by hand, as fast as it
can, at the same moment as the other. Every occurrence a process actually works on is appended to its
own file; across both files each occurrence appears exactly once.

Run as a script, this module is one such process: `python -m tests.test_scheduler_multiprocess URL OUT GO_AT`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.conftest import PostgresDatabases, postgres_admin_url

ROOT = Path(__file__).resolve().parents[1]
OCCURRENCES = 40
BASE = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def settings_for(url: str):  # type: ignore[no-untyped-def]
    from bot.config import load_settings

    return load_settings(
        database_url=url,
        scheduler={
            "retention_days": 30,
            "retention_check_minutes": 0.5 / 60,
            "retrain": False,
            "posts": [
                {"persona": "pirate", "cron": "*/5 * * * *", "prompt": "Ahoy", "channels": ["console:deck"]}
            ],
        },
    )


async def one_process(url: str, out: Path, go_at: float) -> None:
    from bot.scheduler import JobScheduler
    from bot.store import Store
    from personas.registry import PersonaRegistry

    store = Store(url)
    scheduler = JobScheduler(settings_for(url), store, PersonaRegistry.discover())
    execute = scheduler._execute

    async def recorded(job, scheduled_for, *, force):  # type: ignore[no-untyped-def]
        with out.open("a") as fh:
            fh.write(f"{job.id} {scheduled_for.isoformat()}\n")
        return await execute(job, scheduled_for, force=force)

    scheduler._execute = recorded  # type: ignore[method-assign]
    await asyncio.sleep(max(0.0, go_at - time.time()))
    await scheduler.start()
    try:
        occurrences = [BASE + timedelta(minutes=5 * i) for i in range(OCCURRENCES)]
        await asyncio.gather(*(scheduler.run_occurrence("post:pirate:c0", t) for t in occurrences))
        await asyncio.sleep(3.0)  # retention fires about six times meanwhile
    finally:
        await scheduler.stop()
        await store.close()


@pytest.mark.postgres
def test_two_processes_never_run_the_same_occurrence(tmp_path: Path) -> None:
    admin = postgres_admin_url()
    if admin is None:
        pytest.skip("PERSONABOT_TEST_POSTGRES_URL is not set")
    dbs = PostgresDatabases(admin)
    url = asyncio.run(dbs.create())
    try:

        async def migrate() -> None:
            from bot.store import Store

            store = Store(url)
            await store.upgrade()
            await store.close()

        asyncio.run(migrate())
        go_at = time.time() + 4.0  # both processes are imported and connected by then
        outs = [tmp_path / f"p{i}.txt" for i in range(2)]
        env = os.environ | {"PERSONABOT_DATA_DIR": str(tmp_path / "data")}
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.test_scheduler_multiprocess", url, str(out), str(go_at)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for out in outs
        ]
        logs = [p.communicate(timeout=120)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], logs
        lines = [line for out in outs for line in out.read_text().splitlines()]
        per_process = [out.read_text().count("post:pirate") for out in outs]
        posts = [line for line in lines if line.startswith("post:")]
        retention = [line for line in lines if line.startswith("retention")]
        assert len(posts) == len(set(posts)) == OCCURRENCES, logs
        assert len(retention) == len(set(retention)) >= 3, logs
        assert min(per_process) > 0, f"one process did all the work: {per_process}"

        async def queued() -> int:
            from sqlalchemy import func, select

            from bot.store import Store
            from bot.store.models import ReplyJob

            store = Store(url)
            async with store.transaction() as session:
                count = (await session.execute(select(func.count()).select_from(ReplyJob))).scalar_one()
            await store.close()
            return count

        assert asyncio.run(queued()) == OCCURRENCES
    finally:
        asyncio.run(dbs.drop(url))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(one_process(sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])))
