"""Two scheduler processes on one PostgreSQL database never both run the same occurrence.

Each process runs a real `JobScheduler` (its own APScheduler, jobs in memory) with retention due
every half second, and also fires the same 40 occurrences of a scheduled post by hand, as fast as it
can, once both processes are ready. Every occurrence a process actually works on is appended to its
own file; across both files each occurrence appears exactly once, though both tried them all.

Run as a script, this module is one such process:
`python -m tests.test_scheduler_multiprocess URL OUT READY_FLAG PEER_FLAG`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
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


async def one_process(url: str, out: Path, ready: Path, peer: Path) -> None:
    from bot.scheduler import JobScheduler
    from bot.store import Store
    from personas.registry import PersonaRegistry

    store = Store(url)
    scheduler = JobScheduler(settings_for(url), store, PersonaRegistry.discover())
    execute = scheduler._execute

    async def recorded(job, scheduled_for, *, force):  # type: ignore[no-untyped-def]
        with out.open("a") as fh:
            fh.write(f"ran {job.id} {scheduled_for.isoformat()}\n")
        return await execute(job, scheduled_for, force=force)

    scheduler._execute = recorded  # type: ignore[method-assign]
    # Both processes are imported and connected before either fires anything.
    ready.touch()
    while not peer.exists():
        await asyncio.sleep(0.01)
    await scheduler.start()
    try:
        occurrences = [BASE + timedelta(minutes=5 * i) for i in range(OCCURRENCES)]
        results = await asyncio.gather(*(scheduler.run_occurrence("post:pirate:c0", t) for t in occurrences))
        with out.open("a") as fh:
            fh.writelines(f"result {r.status} {r.scheduled_for.isoformat()}\n" for r in results)
        await asyncio.sleep(3.0)  # retention, due every half second, fires meanwhile in both
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
        started = datetime.now(UTC)
        outs = [tmp_path / f"p{i}.txt" for i in range(2)]
        flags = [tmp_path / f"ready{i}" for i in range(2)]
        env = os.environ | {"PERSONABOT_DATA_DIR": str(tmp_path / "data")}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.test_scheduler_multiprocess",
                    url,
                    str(out),
                    str(flags[i]),
                    str(flags[1 - i]),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i, out in enumerate(outs)
        ]
        logs = [p.communicate(timeout=180)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], logs
        lines = [out.read_text().splitlines() for out in outs]
        ran = [line.split(" ", 1)[1] for mine in lines for line in mine if line.startswith("ran ")]
        posts = [r for r in ran if r.startswith("post:")]
        retention = [r for r in ran if r.startswith("retention")]
        # Every occurrence was run exactly once, whichever process got it ...
        fired = {
            f"post:pirate:c0 {(BASE + timedelta(minutes=5 * i)).isoformat()}" for i in range(OCCURRENCES)
        }
        assert len(posts) == len(set(posts)) and set(posts) >= fired, logs
        # ... and any other was the schedule's own, due on the wall clock while the test ran (the
        # post's cron fires every 5 minutes): run once too, by one of the processes.
        extra = [datetime.fromisoformat(post.split(" ", 1)[1]) for post in set(posts) - fired]
        assert all(started - timedelta(minutes=5) <= t <= datetime.now(UTC) for t in extra), logs
        assert len(retention) == len(set(retention)) >= 2, logs
        # ... though each process tried every one of them: the other one's were refused ("taken").
        for mine in lines:
            statuses = [line.split()[1] for line in mine if line.startswith("result ")]
            assert len(statuses) == OCCURRENCES and set(statuses) <= {"ok", "taken"}
        oks = sum(line.startswith("result ok") for mine in lines for line in mine)
        assert oks == OCCURRENCES

        async def queued() -> int:
            from sqlalchemy import func, select

            from bot.store import Store
            from bot.store.models import ReplyJob

            store = Store(url)
            async with store.transaction() as session:
                count = (await session.execute(select(func.count()).select_from(ReplyJob))).scalar_one()
            await store.close()
            return count

        assert asyncio.run(queued()) == len(set(posts))
    finally:
        asyncio.run(dbs.drop(url))


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(one_process(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))
