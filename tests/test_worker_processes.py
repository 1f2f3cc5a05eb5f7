"""`personabot worker` processes: two on one PostgreSQL with one SIGKILLed midway (every job answered
once), and a clean SIGTERM in the middle of a batch."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bot.store import Store
from bot.store.models import Message, OutboxDelivery, ReplyJob
from tests.test_jobs import add_jobs
from tests.test_worker import lively_model, personas_dir

ROOT = Path(__file__).resolve().parent.parent
JOBS = 200


def write_config(tmp_path: Path, db_url: str, stop_timeout: float = 30.0) -> Path:
    model = lively_model(tmp_path / "model")
    personas = personas_dir(tmp_path / "personas", alpha=4, slow=900)
    config = tmp_path / "personabot.toml"
    config.write_text(
        f"""
database_url = "{db_url}"
data_dir = "{tmp_path / "data"}"
personas_dir = "{personas}"

[model]
path = "{model}"
device = "cpu"

[worker]
max_batch = 8
lease_seconds = 3.0
retry_backoff_seconds = 0.0
poll_seconds = 0.05

[run]
heartbeat_seconds = 1.0
stop_timeout_seconds = {stop_timeout}
"""
    )
    return config


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "--config", str(config), "worker", "--threads", "1"],
        cwd=ROOT,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


async def orphans(store: Store, pid: int) -> list[int]:
    """Jobs still leased by the worker process `pid`."""
    async with store.transaction() as session:
        query = select(ReplyJob.id).where(ReplyJob.status == "running", ReplyJob.lease_owner.like(f"%:{pid}"))
        return list((await session.execute(query)).scalars())


async def scalar(store: Store, query: object) -> int:
    async with store.transaction() as session:
        return int((await session.execute(query)).scalar_one())  # type: ignore[call-overload]


@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_two_workers_one_killed_every_job_answered_once(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, db_url)
    ids = await add_jobs(store, JOBS, persona="alpha")
    a = start_worker(config, tmp_path / "a.log")
    b = start_worker(config, tmp_path / "b.log")
    killed_holding: list[int] = []
    try:
        deadline = time.monotonic() + 120
        # Midway, and while worker A holds leased jobs: kill it without any chance to clean up.
        while time.monotonic() < deadline:
            done = await scalar(store, select(func.count()).where(ReplyJob.status == "done"))
            async with store.transaction() as session:
                held = (
                    (
                        await session.execute(
                            select(ReplyJob.id).where(
                                ReplyJob.status == "running", ReplyJob.lease_owner.like(f"%:{a.pid}")
                            )
                        )
                    )
                    .scalars()
                    .all()
                )
            if done >= JOBS // 4 and len(held) >= 3:
                a.send_signal(signal.SIGKILL)
                a.wait(timeout=30)
                killed_holding = await orphans(store, a.pid)
                break
            assert a.poll() is None and b.poll() is None, (tmp_path / "a.log").read_text()[-2000:]
            await asyncio.sleep(0.02)
        assert killed_holding, "worker A held no lease when it was killed"
        while (
            await scalar(store, select(func.count()).where(ReplyJob.status != "done"))
            and time.monotonic() < deadline
        ):
            assert b.poll() is None, (tmp_path / "b.log").read_text()[-2000:]
            await asyncio.sleep(0.1)
        b.send_signal(signal.SIGTERM)  # a clean stop
        assert b.wait(timeout=60) == 0, (tmp_path / "b.log").read_text()[-2000:]
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    async with store.transaction() as session:
        jobs = (await session.execute(select(ReplyJob).where(ReplyJob.id.in_(ids)))).scalars().all()
        replies = (await session.execute(select(Message).where(Message.role == "assistant"))).scalars().all()
        outbox = (await session.execute(select(func.count()).select_from(OutboxDelivery))).scalar_one()
    assert all(j.status == "done" for j in jobs), [
        (j.id, j.status, j.error) for j in jobs if j.status != "done"
    ]
    assert len(replies) == JOBS and outbox == JOBS  # exactly one reply per job, nothing doubled
    assert sorted(j.reply_message_id for j in jobs) == sorted(m.id for m in replies)
    assert len({m.channel_id for m in replies}) == JOBS  # one per channel (each job has its own)
    reclaimed = [j for j in jobs if j.id in killed_holding]
    assert reclaimed and all(j.attempts >= 2 for j in reclaimed)  # the dead worker's jobs were claimed again
    log_b = (tmp_path / "b.log").read_text()
    assert "batch:" in log_b and "stopped" in log_b


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_sigterm_mid_batch_returns_jobs_and_exits_cleanly(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    config = write_config(tmp_path, db_url, stop_timeout=0.5)
    ids = await add_jobs(store, 3, persona="slow")
    proc = start_worker(config, tmp_path / "w.log")
    try:
        deadline = time.monotonic() + 60
        while not await orphans(store, proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "w.log").read_text()[
                -2000:
            ]
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # generating now
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, (tmp_path / "w.log").read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    async with store.transaction() as session:
        jobs = (await session.execute(select(ReplyJob).where(ReplyJob.id.in_(ids)))).scalars().all()
    # Each job either finished or went back to the queue with its attempt not counted; none is stuck.
    assert all(
        j.status == "done" or (j.status == "pending" and j.attempts == 0 and j.lease_owner is None)
        for j in jobs
    )
    assert any(j.status == "pending" for j in jobs)  # 900 tokens each: the stop came mid-batch
    assert re.search(r"[1-9]\d* released", (tmp_path / "w.log").read_text())
