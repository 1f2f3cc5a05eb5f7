"""The scheduler: planning and bad entries, retention, scheduled posts once per occurrence across a
restart, APScheduler firing jobs on short intervals, catch-up after downtime and pruning of run records."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from bot.config import Settings, load_settings
from bot.delivery import OutboxPump
from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming, Outgoing
from bot.scheduler import JobScheduler, plan_jobs, runs
from bot.scheduler.jobs import cron_trigger, crontab_weekdays
from bot.scheduler.posts import dedupe_key
from bot.store import Store, conversations, jobs
from bot.store.models import Erasure, Message, OutboxDelivery, ReplyJob, ScheduledRun, User
from bot.worker import Worker
from personas.registry import PersonaRegistry
from tests.fakes.backend import ScriptedBackend

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def dead_owner() -> str:
    """`host:pid` of a process that has exited: a scheduler that crashed mid-run."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


def channel(key: str, kind: ChannelKind = ChannelKind.GROUP) -> ChannelRef:
    platform, _, rest = key.partition(":")
    external_id, _, thread = rest.partition("/")
    return ChannelRef(platform, external_id, kind, thread_id=thread)


async def say(store: Store, where: str, text: str, at: datetime, user: str = "ada") -> int:
    ref = channel(where)
    event = Incoming(
        platform=ref.platform,
        channel=ref,
        author=AuthorRef(ref.platform, user, user.title()),
        text=text,
        platform_message_id=f"{where}:{text}",
        sent_at=at,
    )
    async with store.transaction() as session:
        return (await conversations.ingest(session, event)).message_id


async def texts(store: Store) -> set[str]:
    async with store.transaction() as session:
        return set((await session.execute(select(Message.text))).scalars())


# -- planning -----------------------------------------------------------------------------------------


def test_bad_entries_become_problems_and_the_rest_is_planned() -> None:
    settings = load_settings(
        scheduler={
            "retention_days": 30,
            "retention_channels": {"not a channel": 1},
            "posts": [
                {"persona": "pirate", "cron": "61 * * * *", "prompt": "hi"},
                {"persona": "nobody", "cron": "0 9 * * *", "prompt": "hi"},
                {"persona": "poet", "cron": "0 9 * * *", "timezone": "Mars/Olympus", "prompt": "hi"},
                {"persona": "poet", "cron": "30 7 * * 1-5", "timezone": "Europe/Berlin", "prompt": "haiku"},
            ],
        }
    )
    defs, problems = plan_jobs(settings, PersonaRegistry.discover())
    ids = {d.id for d in defs}
    assert {"retention", "post:pirate:0", "post:poet:c3", "retrain:pirate", "retrain:poet"} <= ids
    by_job = {p.job_id: p.message for p in problems}
    assert "scheduler.posts.0.cron: invalid cron expression '61 * * * *'" in by_job["post:pirate:c0"]
    assert "scheduler.posts.1.persona: unknown persona 'nobody'" in by_job["post:nobody:c1"]
    assert "scheduler.posts.2.timezone: unknown time zone 'Mars/Olympus'" in by_job["post:poet:c2"]
    assert "'not a channel' is not a `platform:id` channel" in by_job["retention"]
    poet = next(d for d in defs if d.id == "post:poet:c3")
    # 07:30 in Berlin on a Monday is 05:30 UTC in summer.
    fire = poet.trigger.get_next_fire_time(None, datetime(2026, 6, 1, 0, 0, tzinfo=UTC))
    assert fire.astimezone(UTC) == datetime(2026, 6, 1, 5, 30, tzinfo=UTC)


def test_crontab_weekdays_count_from_sunday() -> None:
    # APScheduler 3.x alone would read 0 as Monday; crontab means Sunday.
    sunday_nine = cron_trigger("0 9 * * 0", "UTC").get_next_fire_time(None, NOW)
    assert sunday_nine == datetime(2026, 6, 7, 9, 0, tzinfo=UTC) and sunday_nine.strftime("%A") == "Sunday"
    assert crontab_weekdays("1-5") == "mon,tue,wed,thu,fri"
    assert crontab_weekdays("5-7") == "sun,fri,sat"
    assert crontab_weekdays("*/2") == "sun,tue,thu,sat"
    assert crontab_weekdays("SAT,sun") == "sun,sat"
    for bad in ("8", "5-1", "mon/0", "x"):
        with pytest.raises(ValueError):
            crontab_weekdays(bad)


def test_nothing_configured_plans_no_retention() -> None:
    defs, problems = plan_jobs(load_settings(scheduler={"retrain": False}), PersonaRegistry.discover())
    assert problems == []
    assert {d.kind for d in defs} == {"post"}  # the builtin pirate's morning greeting


# -- retention ----------------------------------------------------------------------------------------


async def test_retention_deletes_only_what_it_should(store: Store) -> None:
    settings = load_settings(
        scheduler={"retention_days": 30, "retention_channels": {"console:short": 1, "telegram:-100/7": 2}}
    )
    day = timedelta(days=1)
    await say(store, "console:long", "long old", NOW - 40 * day)
    await say(store, "console:long", "long recent", NOW - 10 * day)
    waiting = await say(store, "console:long", "long old but its reply is queued", NOW - 40 * day)
    answered = await say(store, "console:long", "long old and answered", NOW - 40 * day)
    undelivered = await say(store, "console:long", "long old, reply not delivered yet", NOW - 40 * day)
    await say(store, "console:short", "short two days", NOW - 2 * day)
    await say(store, "console:short", "short twelve hours", NOW - day / 2)
    await say(store, "telegram:-100/7", "thread three days", NOW - 3 * day)
    await say(store, "telegram:-100/7", "thread one day", NOW - day)
    await say(store, "telegram:-100", "main three days", NOW - 3 * day)
    await say(store, "telegram:-100", "main 31 days", NOW - 31 * day)

    async with store.transaction() as session:
        long_id = await conversations.find_channel(session, channel("console:long"))
        for trigger in (answered, undelivered, waiting):  # a channel's jobs are answered in order
            await jobs.enqueue(
                session,
                channel_id=long_id,
                persona="pirate",
                dedupe_key=f"t{trigger}",
                trigger_message_id=trigger,
            )
        session.add(Erasure(platform="console", user_external_id="bob", channel_id=long_id, requested_at=NOW))
    # Answer two of them through the real queue (one at a time per channel); their replies are old too.
    for _ in range(3):
        async with store.transaction() as session:
            (job,) = await jobs.claim(session, owner="w", limit=10, lease_seconds=60, max_attempts=3)
        if job.trigger_message_id == waiting:
            continue
        async with store.transaction() as session:
            reply = await jobs.complete(
                session, job, text=f"reply {job.trigger_message_id}", persona="pirate", platform="console"
            )
            await session.execute(
                update(Message).where(Message.id == reply).values(created_at=NOW - 40 * day)
            )
            if job.trigger_message_id == answered:
                await session.execute(
                    update(OutboxDelivery)
                    .where(OutboxDelivery.message_id == reply)
                    .values(status="delivered")
                )
    async with store.transaction() as session:  # the waiting job is pending again, as after a retry
        await session.execute(
            update(ReplyJob).where(ReplyJob.trigger_message_id == waiting).values(status="pending")
        )

    result = await JobScheduler(settings, store, PersonaRegistry.discover()).run_occurrence("retention", NOW)

    assert result.status == "ok", result.summary
    assert await texts(store) == {
        "long recent",
        "long old but its reply is queued",
        f"reply {undelivered}",  # still waiting in the outbox (the message it answers may go)
        "short twelve hours",
        "thread one day",
        "main three days",
    }
    assert result.detail["channels"] == {"console:short": 1, "telegram:-100/7": 1}
    assert result.detail["deleted_messages"] == 7
    async with store.transaction() as session:
        statuses = list((await session.execute(select(ReplyJob.status).order_by(ReplyJob.id))).scalars())
        assert statuses == ["pending"]  # finished jobs went with their trigger messages
        assert (await session.execute(select(func.count()).select_from(User))).scalar_one() == 2  # users stay
        assert (await session.execute(select(func.count()).select_from(Erasure))).scalar_one() == 1
        outbox = list((await session.execute(select(OutboxDelivery.status))).scalars())
        assert outbox == ["pending"]


async def test_retention_run_again_for_the_same_occurrence_does_nothing(store: Store) -> None:
    settings = load_settings(scheduler={"retention_days": 1})
    await say(store, "console:a", "old", NOW - timedelta(days=2))
    scheduler = JobScheduler(settings, store, PersonaRegistry.discover())
    first = await scheduler.run_occurrence("retention", NOW)
    await say(store, "console:a", "old again", NOW - timedelta(days=2))
    second = await scheduler.run_occurrence("retention", NOW)
    assert (first.status, second.status) == ("ok", "taken")
    assert await texts(store) == {"old again"}


# -- scheduled posts ----------------------------------------------------------------------------------


class Recorder:
    """A platform that records what it is asked to post."""

    platform = "console"

    def __init__(self) -> None:
        self.posted: list[Outgoing] = []

    async def deliver(self, reply: Outgoing) -> list[str]:
        self.posted.append(reply)
        return [f"p{reply.outbox_id}"]


def post_settings(cron: str = "0 9 * * *") -> Settings:
    # A day of grace: yesterday's 09:00 can still be finished after a restart, and no new occurrence
    # falls due while a test runs.
    return load_settings(
        scheduler={
            "retrain": False,
            "misfire_grace_seconds": 2 * 86400,
            "posts": [{"persona": "pirate", "cron": cron, "prompt": "Say good morning."}],
        }
    )


def latest_fire(settings: Settings, job_id: str, now: datetime) -> datetime:
    """The job's newest occurrence at or before `now`."""
    defs, _ = plan_jobs(settings, PersonaRegistry.discover())
    trigger = next(d for d in defs if d.id == job_id).trigger
    fire = trigger.get_next_fire_time(None, now - timedelta(days=1, seconds=1))
    while True:
        following = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
        if following > now:
            return fire.astimezone(UTC)
        fire = following


async def test_cron_post_is_made_once_per_occurrence_across_a_restart(store: Store) -> None:
    settings = post_settings()
    registry = PersonaRegistry.discover()
    async with store.transaction() as session:
        deck = await conversations.upsert_channel(session, channel("console:deck"))
        galley = await conversations.upsert_channel(session, channel("console:galley"))
        for channel_id in (deck, galley):
            await conversations.bind_persona(session, channel_id, "pirate", bound_by=None)
    job_id = "post:pirate:c0"
    now = datetime.now(UTC)
    second = latest_fire(settings, job_id, now)
    first = second - timedelta(days=1)

    # The first occurrence runs normally.
    before = JobScheduler(settings, store, registry)
    assert (await before.run_occurrence(job_id, first)).status == "ok"
    # The second: the process died after queuing the post for one channel of two.
    async with store.transaction() as session:
        await runs.claim(session, job_id, second, owner=dead_owner(), stale_after=timedelta(hours=1))
        entry = next(d.post for d in before.jobs if d.id == job_id)
        await jobs.enqueue(
            session,
            channel_id=deck,
            persona="pirate",
            dedupe_key=dedupe_key(entry, second, deck),
            kind="scheduled",
            prompt="x",
        )

    # Restart: the new process finishes the half-done occurrence on start.
    after = JobScheduler(settings, store, registry)
    await after.start()
    try:
        await after.wait_idle()
        # Firing both occurrences again (a second process, a misfire replay) changes nothing.
        again = [await after.run_occurrence(job_id, t) for t in (first, second)]
        other = JobScheduler(settings, store, registry)
        again += [await other.run_occurrence(job_id, t) for t in (first, second)]
    finally:
        await after.stop()
    assert [r.status for r in again] == ["taken"] * 4

    async with store.transaction() as session:
        queued = (
            await session.execute(
                select(ReplyJob.channel_id, ReplyJob.dedupe_key).where(ReplyJob.kind == "scheduled")
            )
        ).all()
        recorded = (
            await session.execute(
                select(ScheduledRun.run_key, ScheduledRun.status).where(ScheduledRun.job_id == job_id)
            )
        ).all()
    assert sorted(channel_id for channel_id, _ in queued) == [deck, deck, galley, galley]
    assert len({key for _, key in queued}) == 4
    assert sorted(status for _, status in recorded) == ["ok", "ok"]

    # The posts go through the normal worker and outbox path: one message per channel per occurrence.
    worker = Worker(settings, store, registry, ScriptedBackend(lambda prompt: "Ahoy, good morning!"))
    while await worker.run_once():
        pass
    platform = Recorder()
    assert await OutboxPump(store, platform).flush() == 4  # type: ignore[arg-type]
    assert sorted(p.channel.external_id for p in platform.posted) == ["deck", "deck", "galley", "galley"]
    assert {p.text for p in platform.posted} == {"Ahoy, good morning!"}
    assert all(p.reply_to is None for p in platform.posted)
    assert "Say good morning." in worker.backend.prompts[0]  # type: ignore[attr-defined]


async def test_post_without_channels_is_skipped_with_the_reason(store: Store) -> None:
    scheduler = JobScheduler(post_settings(), store, PersonaRegistry.discover())
    result = await scheduler.run_occurrence("post:pirate:c0", NOW)
    assert result.status == "skipped"
    assert "no channel to post in" in result.summary and "/persona pirate" in result.summary


async def test_listed_channels_are_posted_even_before_the_bot_saw_them(store: Store) -> None:
    settings = load_settings(
        scheduler={
            "retrain": False,
            "posts": [
                {
                    "persona": "poet",
                    "cron": "0 8 * * *",
                    "prompt": "A haiku.",
                    "channels": ["telegram:-1001", "discord:5/9"],
                }
            ],
        }
    )
    result = await JobScheduler(settings, store, PersonaRegistry.discover()).run_occurrence(
        "post:poet:c0", NOW
    )
    assert result.status == "ok" and result.detail["queued"] == ["telegram:-1001", "discord:5/9"]


# -- firing, restarts and catch-up ---------------------------------------------------------------------


async def test_apscheduler_fires_due_jobs_on_short_intervals(store: Store) -> None:
    settings = load_settings(
        scheduler={"retention_days": 30, "retention_check_minutes": 0.5 / 60, "retrain": False}
    )
    scheduler = JobScheduler(settings, store, PersonaRegistry.discover())
    await scheduler.start()
    try:
        async with asyncio.timeout(20):
            while True:
                async with store.transaction() as session:
                    done = list(
                        (
                            await session.execute(
                                select(ScheduledRun).where(
                                    ScheduledRun.job_id == "retention", ScheduledRun.status == "ok"
                                )
                            )
                        ).scalars()
                    )
                if len(done) >= 3:
                    break
                await asyncio.sleep(0.1)
        assert (await scheduler.next_run_times())["retention"] > max(r.scheduled_for for r in done)
    finally:
        await scheduler.stop()
    # Occurrences fall on the half-second grid every process computes alike.
    assert all(r.scheduled_for.microsecond in (0, 500000) for r in done)
    assert len({r.run_key for r in done}) == len(done)


async def test_a_restart_plans_the_same_next_runs(store: Store) -> None:
    settings = post_settings()
    registry = PersonaRegistry.discover()
    first = JobScheduler(settings, store, registry)
    await first.start()
    planned = await first.next_run_times()
    await first.stop()
    second = JobScheduler(settings, store, registry)
    await second.start()
    try:
        assert await second.next_run_times() == planned
    finally:
        await second.stop()
    # A job dropped from the config is no longer planned.
    third = JobScheduler(load_settings(scheduler={"retrain": False}), store, registry)
    await third.start()
    try:
        assert "post:pirate:c0" not in await third.next_run_times()
    finally:
        await third.stop()


async def test_a_failing_job_does_not_stop_the_others(store: Store) -> None:
    settings = load_settings(
        scheduler={
            "retention_days": 30,
            "retention_check_minutes": 0.5 / 60,
            "retrain": False,
            "posts": [{"persona": "pirate", "cron": "* * * * *", "prompt": "hi", "channels": ["console:x"]}],
        }
    )
    scheduler = JobScheduler(settings, store, PersonaRegistry.discover())

    async def broken(*_: Any) -> None:
        raise RuntimeError("the disk is full")

    import bot.scheduler.service as service

    original = service.queue_post
    service.queue_post = broken  # type: ignore[assignment]
    try:
        post = await scheduler.run_occurrence("post:pirate:c0", NOW)
        retention = await scheduler.run_occurrence("retention", NOW)
    finally:
        service.queue_post = original  # type: ignore[assignment]
    assert post.status == "error" and post.summary == "RuntimeError: the disk is full"
    assert retention.status == "ok"
    async with store.transaction() as session:
        last = await runs.last_runs(session)
    assert last["post:pirate:c0"].error == "RuntimeError: the disk is full"
    assert last["retention"].status == "ok"


async def test_jobs_keep_firing_while_a_store_transaction_holds_the_sqlite_lock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite: while a store transaction holds the write lock across awaits (as the worker's do), the
    loop goes on, due occurrences wait for the lock like any writer, and none fails with "database is
    locked"."""
    store = Store(f"sqlite:///{tmp_path / 'bot.db'}")
    await store.upgrade()
    settings = load_settings(
        scheduler={"retention_days": 30, "retention_check_minutes": 0.2 / 60, "retrain": False}
    )
    scheduler = JobScheduler(settings, store, PersonaRegistry.discover())
    await scheduler.start()
    try:
        with caplog.at_level(logging.WARNING, logger="bot.scheduler"):
            async with store.transaction() as session:
                await conversations.upsert_channel(session, channel("console:busy"))  # takes the lock
                for _ in range(15):
                    await asyncio.sleep(0.1)  # ... and keeps it across awaits while jobs fall due
            async with asyncio.timeout(20):
                while True:
                    async with store.transaction() as session:
                        ran = (
                            await session.execute(
                                select(func.count())
                                .select_from(ScheduledRun)
                                .where(ScheduledRun.status == "ok")
                            )
                        ).scalar_one()
                    if ran >= 2:
                        break
                    await asyncio.sleep(0.05)
    finally:
        await scheduler.stop()
        await store.close()
    assert "database is locked" not in caplog.text
    assert "failed" not in caplog.text


async def record_run(store: Store, job_id: str, scheduled_for: datetime, *, started: datetime) -> None:
    """A finished occurrence, as an earlier process left it."""
    async with store.transaction() as session:
        run_id = await runs.claim(session, job_id, scheduled_for, owner="earlier:1", stale_after=timedelta(0))
        assert run_id is not None
        await runs.finish(session, run_id, status="ok")
        await session.execute(
            update(ScheduledRun).where(ScheduledRun.id == run_id).values(started_at=started)
        )


async def post_runs(store: Store, job_id: str) -> list[datetime]:
    async with store.transaction() as session:
        rows = await session.execute(
            select(ScheduledRun.scheduled_for)
            .where(ScheduledRun.job_id == job_id)
            .order_by(ScheduledRun.scheduled_for)
        )
        return list(rows.scalars())


async def test_an_occurrence_missed_while_nothing_ran_is_run_on_start(store: Store) -> None:
    """Catch-up comes from `scheduled_runs`: the latest occurrence after the job's last recorded run,
    within the grace time, runs once on start (and only once, though two processes start)."""
    settings = post_settings("* * * * *")  # every minute, a day of grace
    registry = PersonaRegistry.discover()
    job_id = "post:pirate:c0"
    now = datetime.now(UTC)
    missed = latest_fire(settings, job_id, now)
    before = missed - timedelta(minutes=30)  # the last run before the downtime
    await record_run(store, job_id, before, started=before)

    first, second = (JobScheduler(settings, store, registry) for _ in range(2))
    await first.start()
    await second.start()
    try:
        await first.wait_idle()
        await second.wait_idle()
    finally:
        await first.stop()
        await second.stop()
    runs_now = await post_runs(store, job_id)
    # The occurrence at or before the start ran once (the other process found it taken); the older
    # missed ones were coalesced away. (A minute boundary may pass while the test runs: hence >=.)
    assert runs_now[0] == before and runs_now[1] >= missed
    assert len(runs_now) == len(set(runs_now))
    assert not any(before < t < missed for t in runs_now)


async def test_a_new_job_and_an_occurrence_past_the_grace_are_not_caught_up(store: Store) -> None:
    registry = PersonaRegistry.discover()
    job_id = "post:pirate:c0"
    now = datetime.now(UTC)
    # A job that never ran starts with its next occurrence, not the one just gone.
    fresh = JobScheduler(post_settings("* * * * *"), store, registry)
    await fresh.start()
    await fresh.stop()
    assert [t for t in await post_runs(store, job_id) if t <= now] == []
    # A daily post last run two days ago, with an hour of grace: today's 09:00 is long past the grace
    # unless the test runs just after 09:00; then it is the one caught up.
    settings = load_settings(
        scheduler={
            "retrain": False,
            "misfire_grace_seconds": 3600,
            "posts": [{"persona": "pirate", "cron": "0 9 * * *", "prompt": "Say good morning."}],
        }
    )
    latest = latest_fire(settings, job_id, now)
    old = latest - timedelta(days=2)
    await record_run(store, job_id, old, started=old)
    late = JobScheduler(settings, store, registry)
    await late.start()
    await late.wait_idle()
    await late.stop()
    expected = [old, latest] if now - latest <= timedelta(hours=1) else [old]
    assert await post_runs(store, job_id) == expected


async def test_run_records_past_the_history_period_are_pruned(store: Store) -> None:
    settings = load_settings(scheduler={"retention_days": 30, "run_history_days": 7, "retrain": False})
    scheduler = JobScheduler(settings, store, PersonaRegistry.discover())
    day = timedelta(days=1)
    now = datetime.now(UTC)
    for age in (20, 10, 3):
        await record_run(store, "retention", now - age * day, started=now - age * day)
    await record_run(store, "post:gone:c0", now - 40 * day, started=now - 40 * day)  # a removed job
    await record_run(store, "post:gone:c1", now - 40 * day, started=now - 40 * day)
    await record_run(store, "post:gone:c1", now - 30 * day, started=now - 30 * day)

    # Running a job trims that job's own history.
    assert (await scheduler.run_occurrence("retention", now)).status == "ok"
    assert [t.date() for t in await post_runs(store, "retention")] == [(now - 3 * day).date(), now.date()]
    assert len(await post_runs(store, "post:gone:c1")) == 2

    # Starting trims every job's history, keeping each job's newest record.
    restarted = JobScheduler(settings, store, PersonaRegistry.discover())
    await restarted.start()
    await restarted.stop()
    assert await post_runs(store, "post:gone:c1") == [now - 30 * day]
    assert await post_runs(store, "post:gone:c0") == [now - 40 * day]


async def test_pruning_leaves_runs_in_progress_to_recovery(store: Store) -> None:
    now = datetime.now(UTC)
    async with store.transaction() as session:
        await runs.claim(
            session, "post:x:c0", now - timedelta(days=40), owner="x:1", stale_after=timedelta(0)
        )
    await record_run(store, "post:x:c0", now - timedelta(days=30), started=now - timedelta(days=30))
    async with store.transaction() as session:
        await session.execute(update(ScheduledRun).values(started_at=now - timedelta(days=40)))
        assert await runs.prune(session, before=now - timedelta(days=7)) == 0
    assert len(await post_runs(store, "post:x:c0")) == 2
