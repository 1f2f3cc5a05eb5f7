"""Benchmark: the whole pipeline, platform event to platform post, with an instant backend.

    .venv/bin/python tests/bench/bench_pipeline.py [--db sqlite,aiosqlite,postgresql] [--rates 50,100,200]
                                                   [--seconds 5] [--channels 50] [--quick]

`--quick` (or BENCH_QUICK=1) runs 20 and 100 msg/s for 3 s each, for a check in about a minute.

One `BotApp` (dispatcher, worker, outbox pump) runs around an in-memory platform: the driver offers
messages at a fixed rate across many direct channels, each through the dispatcher as an adapter hands
it over; the platform records when each reply is posted. The backend answers at once (the scripted test
backend), so what is measured is what personabot adds: storing, the job queue, wake-ups, prompt
rendering, the outbox. `sqlite` is personabot's default SQLite driver, which runs statements in the
event loop's thread (bot/store/sqlite_inline.py); `aiosqlite` is the same database through aiosqlite's
thread, for comparison. PostgreSQL needs PERSONABOT_TEST_POSTGRES_URL (a fresh database per run).

Prints, per database and offered rate: messages/s answered, the added latency p50 and p99 from the
event to the post, and whether the rate was sustained (every message answered, answered rate within 5%
of the offered one). Goal: p50 <= 50 ms and p99 <= 250 ms at 100 msg/s.

Latency depends on how much CPU the machine gives the process; the CPU time per message (all threads
of the process, from `time.process_time`) and the SQL statements per message do not, so they are
printed too: the numbers to compare between versions on a busy machine. The last columns are the
median time a job waited to be claimed, was generated and written, and waited to be posted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sqlalchemy import event

from bot.app import BotApp
from bot.config import load_settings
from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming, Outgoing, PlatformConventions
from bot.store import Store
from tests.conftest import POSTGRES_URL_ENV, PostgresDatabases
from tests.fakes.backend import ScriptedBackend
from tests.test_worker import personas_dir, registry_of
from tests.tiny import byte_level_tokenizer


class InstantPlatform:
    """A platform whose API answers at once; it records when each reply is posted."""

    platform = "console"
    conventions = PlatformConventions()

    def __init__(self) -> None:
        self.posted: dict[str, float] = {}  # trigger's platform message id -> time of the post
        self.on_event = None

    async def start(self, on_event) -> None:  # type: ignore[no-untyped-def]
        self.on_event = on_event

    async def deliver(self, reply: Outgoing) -> list[str]:
        self.posted[reply.reply_to or ""] = time.perf_counter()
        return [f"p{reply.outbox_id}"]

    async def edit(self, channel: ChannelRef, platform_message_id: str, text: str) -> None:
        return None

    async def typing(self, channel: ChannelRef) -> None:
        return None

    async def stop_receiving(self) -> None:
        return None

    async def stop(self) -> None:
        return None


async def run_once(url: str, rate: int, seconds: float, channels: int, root: Path) -> dict[str, float]:
    store = Store(url)
    await store.upgrade()
    folder = personas_dir(root / f"personas-{rate}-{time.monotonic_ns()}", bench=16)
    settings = load_settings(
        default_persona="bench",
        data_dir=str(root / f"data-{rate}-{time.monotonic_ns()}"),  # the ingest spool, not ./.personabot
        personas_dir=str(folder),
        access={"user_cooldown_per_minute": 0, "channel_cooldown_per_minute": 0},
    )
    platform = InstantPlatform()
    backend = ScriptedBackend(lambda prompt: "ok, noted.", tokenizer=TOKENIZER)
    app = BotApp(settings, store, registry_of(folder), [platform], backend)  # type: ignore[list-item]
    await app.start()
    statements = 0

    def count(*_args: object) -> None:
        nonlocal statements
        statements += 1

    event.listen(store.engine.sync_engine, "before_cursor_execute", count)
    sent: dict[str, float] = {}
    total = int(rate * seconds)
    handlers: list[asyncio.Task[object]] = []

    async def send(n: int) -> None:
        mid = f"m{n}"
        sent[mid] = time.perf_counter()
        await platform.on_event(  # type: ignore[misc]
            Incoming(
                platform="console",
                channel=ChannelRef("console", f"c{n % channels}", ChannelKind.DIRECT),
                author=AuthorRef("console", f"u{n % channels}", "User"),
                text=f"message number {n}",
                platform_message_id=mid,
            )
        )

    try:
        start, cpu = time.perf_counter(), time.process_time()
        for n in range(total):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            handlers.append(asyncio.create_task(send(n)))
        await asyncio.gather(*handlers)
        deadline = time.perf_counter() + 30
        while len(platform.posted) < total and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        cpu = time.process_time() - cpu
        event.remove(store.engine.sync_engine, "before_cursor_execute", count)
        stages = await stage_medians(store)
    finally:
        await app.stop(flush_timeout=0)
        await store.close()
    latencies = sorted((platform.posted[m] - sent[m]) * 1000 for m in sent if m in platform.posted)
    answered = len(latencies)
    span = max(platform.posted.values()) - start if platform.posted else float("inf")
    return {
        "offered": rate,
        "answered": answered,
        "total": total,
        "rate": answered / span,
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p99": latencies[min(answered - 1, int(0.99 * answered))] if latencies else float("nan"),
        "cpu_ms": cpu * 1000 / max(answered, 1),
        "statements": statements / max(answered, 1),
        **stages,
    }


async def stage_medians(store: Store) -> dict[str, float]:
    """Where the time goes, from the rows' own timestamps: queued -> claimed -> written -> posted."""
    from sqlalchemy import select

    from bot.store.models import OutboxDelivery, ReplyJob

    async with store.transaction() as session:
        rows = (
            await session.execute(
                select(
                    ReplyJob.created_at,
                    ReplyJob.started_at,
                    ReplyJob.finished_at,
                    OutboxDelivery.delivered_at,
                )
                .join(OutboxDelivery, OutboxDelivery.message_id == ReplyJob.reply_message_id)
                .where(OutboxDelivery.delivered_at.is_not(None))
            )
        ).all()

    def median_ms(pairs: list[tuple[object, object]]) -> float:
        values = [(b - a).total_seconds() * 1000 for a, b in pairs]  # type: ignore[operator]
        return statistics.median(values) if values else float("nan")

    return {
        "queued": median_ms([(r[0], r[1]) for r in rows]),
        "worker": median_ms([(r[1], r[2]) for r in rows]),
        "outbox": median_ms([(r[2], r[3]) for r in rows]),
    }


TOKENIZER = None
SQLITE_DRIVERS = {"sqlite": "sqlite", "aiosqlite": "sqlite+aiosqlite"}


async def main() -> None:
    global TOKENIZER
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--db", default="sqlite,aiosqlite,postgresql", help="comma-separated: sqlite, aiosqlite, postgresql"
    )
    parser.add_argument("--rates", default="50,100,200,400")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--channels", type=int, default=50)
    parser.add_argument(
        "--quick",
        action="store_true",
        default=os.environ.get("BENCH_QUICK") == "1",
        help="20 and 100 msg/s for 3 s each (also BENCH_QUICK=1)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rates, args.seconds = "20,100", 3.0
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("bot.worker.core").setLevel(os.environ.get("BENCH_WORKER_LOG", "WARNING"))
    TOKENIZER = byte_level_tokenizer()
    rates = [int(r) for r in args.rates.split(",")]
    dbs = args.db.split(",")
    unknown = set(dbs) - set(SQLITE_DRIVERS) - {"postgresql"}
    if unknown:
        parser.error(f"--db: unknown {', '.join(sorted(unknown))}")
    print(
        f"{'database':<11}{'offered/s':>10}{'answered/s':>12}{'answered':>12}{'p50 ms':>9}{'p99 ms':>9}"
        f"  sustained  {'CPU ms/msg':>10}{'SQL/msg':>8}  queued / generated / posted ms"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for db in dbs:
            best = None
            for rate in rates:
                if db in SQLITE_DRIVERS:
                    url = f"{SQLITE_DRIVERS[db]}:///{root / f'bench-{db}-{rate}.db'}"
                    result = await run_once(url, rate, args.seconds, args.channels, root)
                else:
                    admin = os.environ.get(POSTGRES_URL_ENV)
                    if not admin:
                        print(f"postgresql: skipped ({POSTGRES_URL_ENV} is not set)")
                        break
                    dbs_admin = PostgresDatabases(admin)
                    url = await dbs_admin.create()
                    try:
                        result = await run_once(url, rate, args.seconds, args.channels, root)
                    finally:
                        await dbs_admin.drop(url)
                sustained = result["answered"] == result["total"] and result["rate"] >= 0.95 * rate
                if sustained:
                    best = rate
                print(
                    f"{db:<11}{rate:>10}{result['rate']:>12.1f}{int(result['answered']):>7}/{int(result['total']):<4}"
                    f"{result['p50']:>9.1f}{result['p99']:>9.1f}  {'yes' if sustained else 'no':<9}"
                    f"  {result['cpu_ms']:>10.1f}{result['statements']:>8.1f}  {result['queued']:.0f} / "
                    f"{result['worker']:.0f} / {result['outbox']:.0f}",
                    flush=True,
                )
            print(f"{db}: highest sustained rate offered: {best or 'none'} msg/s")


if __name__ == "__main__":
    asyncio.run(main())
