"""`personabot status`: components from heartbeats (running, stale, stopped), the reply queue with its
oldest pending job and failures, active adapters with held-out loss, scheduled jobs' last runs."""

from __future__ import annotations

import asyncio
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from adapters.console import ConsoleAdapter
from bot.app import BotApp
from bot.cli import main
from bot.config import load_settings
from bot.events import utcnow
from bot.scheduler import JobDef, JobScheduler
from bot.status import collect_status, render_status
from bot.store import Store, conversations, jobs, outbox
from bot.store.models import AdapterVersion
from personas import versions
from personas.registry import PersonaRegistry
from tests.fakes.backend import ScriptedBackend
from tests.test_scheduler import NOW, channel


async def fill(store: Store) -> list[JobDef]:
    """Two pending jobs, one failed one, an active adapter with its held-out loss, scheduled runs."""
    async with store.transaction() as session:
        channel_id = await conversations.upsert_channel(session, channel("console:status"))
        for n in range(3):
            await jobs.enqueue(session, channel_id=channel_id, persona="pirate", dedupe_key=f"k{n}")
    async with store.transaction() as session:
        (first, *_) = await jobs.claim(session, owner="w", limit=1, lease_seconds=60, max_attempts=1)
        await jobs.fail(session, first, error="RuntimeError: boom", max_attempts=1, backoff_seconds=0)
        await versions.register_version(
            session, "pirate", "v3", "/loras/pirate/v3", "", {"heldout_loss_after": 1.2345}
        )
        await session.execute(update(AdapterVersion).values(is_active=True, activated_at=utcnow()))
    settings = load_settings(
        scheduler={"retention_days": 7, "posts": [{"persona": "nobody", "cron": "0 9 * * *", "prompt": "x"}]}
    )
    scheduler = JobScheduler(settings, store, PersonaRegistry.discover())
    await scheduler.start()
    try:
        await scheduler.run_occurrence("retention", NOW)
    finally:
        await scheduler.stop()
    return scheduler.jobs


async def test_status_reports_queue_adapters_and_schedule(store: Store) -> None:
    plan = await fill(store)
    report = await collect_status(store, personas=["pirate", "poet"], plan=plan)
    queue = report["queue"]
    assert (queue["pending"], queue["failed"]) == (2, 1)
    assert queue["oldest_pending"]["persona"] == "pirate"
    assert queue["recent_failures"][0]["error"] == "RuntimeError: boom"
    personas = {p["persona"]: p for p in report["personas"]}
    assert personas["pirate"]["active_version"] == "v3" and personas["pirate"]["heldout_loss"] == 1.2345
    assert personas["poet"]["active_version"] is None
    schedule = {j["job_id"]: j for j in report["schedule"]}
    assert schedule["retention"]["scheduled"] and schedule["retention"]["last_run"]["status"] == "ok"
    assert schedule["retention"]["next_run"] is not None
    assert not schedule["post:nobody:c0"]["scheduled"]
    assert "unknown persona 'nobody'" in schedule["post:nobody:c0"]["last_run"]["error"]

    text = render_status(report)
    assert "pending 2, running 0, failed 1, done 0" in text
    assert "failed job 1 (pirate): RuntimeError: boom" in text
    assert "pirate: adapter v3 (held-out loss 1.2345)" in text
    assert "poet: base model (no adapter active)" in text
    assert "retention: next " in text and "last: ok at 2026-" in text
    assert "post:nobody:c0: not scheduled; last: error at" in text


async def test_status_shows_a_refused_delivery_with_its_code_channel_and_words(store: Store) -> None:
    async with store.transaction() as session:
        channel_id = await conversations.upsert_channel(session, channel("discord:dm-7"))
        await jobs.enqueue(session, channel_id=channel_id, persona="pirate", dedupe_key="k")
    async with store.transaction() as session:
        (job,) = await jobs.claim(session, owner="w", limit=1, lease_seconds=60, max_attempts=1)
        await jobs.complete(session, job, text="ahoy", persona="pirate", platform="discord")
    async with store.transaction() as session:
        (item,) = await outbox.claim(session, platform="discord", owner="p", limit=1, lease_seconds=30)
        await outbox.mark_refused(
            session, item.lease, code="403/50007", reason="Cannot send messages to this user"
        )
    report = await collect_status(store, personas=["pirate"])
    (failure,) = report["queue"]["outbox"]["recent_failures"]
    assert failure["code"] == "403/50007" and failure["channel"] == "discord:dm-7"
    assert (
        f"failed delivery {item.reply.outbox_id} to discord:dm-7: 403/50007 Cannot send messages to this user"
        in render_status(report)
    )


async def test_heartbeats_show_running_stale_and_stopped(store: Store) -> None:
    settings = load_settings(run={"heartbeat_seconds": 1.0})
    console = ConsoleAdapter("beats", user="ada", stdout=io.StringIO(), interactive=False)
    app = BotApp(settings, store, PersonaRegistry.discover(), [console], ScriptedBackend(), heartbeats=True)
    await app.start()
    try:
        await asyncio.sleep(0.05)
        running = await collect_status(store)
        # Seen from a minute later, with no beat since: the process went silent without saying so.
        stale = await collect_status(store, now=utcnow() + timedelta(minutes=1))
    finally:
        await app.stop()
    stopped = await collect_status(store)
    states = lambda report: {c["component"].split("@")[0]: c["state"] for c in report["components"]}  # noqa: E731
    assert states(running) == {"adapter:console": "running", "worker": "running"}
    assert states(stale) == {"adapter:console": "stale", "worker": "stale"}
    assert states(stopped) == {"adapter:console": "stopped", "worker": "stopped"}
    assert "adapter:console@" in render_status(stopped) and ": stopped, last seen" in render_status(stopped)


def test_status_command_prints_text_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'bot.db'}"
    monkeypatch.setenv("PERSONABOT_DATABASE_URL", url)

    async def go() -> None:
        store = Store(url)
        await store.upgrade()
        await fill(store)
        await store.close()

    asyncio.run(go())
    assert main(["status"]) == 0
    text = capsys.readouterr().out
    assert "reply queue:" in text and "pirate: adapter v3 (held-out loss 1.2345)" in text
    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"checked_at", "components", "queue", "personas", "schedule", "spool"}
    assert {p["persona"] for p in data["personas"]} == {"assistant", "pirate", "poet"}

    assert main(["schedule", "list"]) == 0
    listed = capsys.readouterr().out
    assert "retrain:pirate: retrain pirate once it has 50 new opted-in conversations" in listed
    assert "post:pirate:0: pirate posts at '0 9 * * *' (UTC) in its bound channels" in listed
    assert main(["schedule", "run", "retention"]) == 2  # retention is off in this config
    assert (
        "unknown scheduled job 'retention' (retention is off: set scheduler.retention_days"
        in capsys.readouterr().err
    )
    assert main(["schedule", "run", "post:pirate:0"]) == 0
    assert (
        "post:pirate:0: skipped: personas/pirate/persona.toml: schedule.0: no channel to post in"
        in capsys.readouterr().out
    )
