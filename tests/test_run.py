"""`personabot run` as a real process: adapters with credentials start (Telegram against a fake Bot API,
the console when asked), the others are reported skipped; SIGTERM stops it cleanly with exit 0.
And in process: a stop returns jobs the worker could not finish to the queue at once."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from adapters.console import ConsoleAdapter
from bot.app import BotApp
from bot.config import load_settings
from bot.status import collect_status
from bot.store import Store
from bot.store.models import Heartbeat, Message, ReplyJob, User
from personas.registry import PersonaRegistry
from tests.fakes.backend import ScriptedBackend
from tests.fakes.telegram_server import TOKEN, FakeBotAPI, FakeChat, FakeUser
from tests.processes import ROOT, persona_env, started
from tests.tiny import save_tiny_model

TESTER = """
name = "Tester"
system_prompt = "You are terse."
template = "chatml"
dialogues = []

[sampling]
temperature = 1.0
top_p = 1.0
top_k = 0
max_new_tokens = 12
"""


def run_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A tiny model, a persona sampling from its whole (near-uniform) distribution, quick beats.

    Greedy decoding would not do: the random tiny model's top token is a newline, an empty reply.
    """
    return persona_env(
        tmp_path,
        "tester",
        TESTER,
        PERSONABOT_MODEL__PATH=str(save_tiny_model(tmp_path / "model")),
        PERSONABOT_RUN__HEARTBEAT_SECONDS="0.5",
        **extra,
    )


async def test_run_serves_telegram_and_the_console_and_stops_on_sigterm(tmp_path: Path) -> None:
    api = FakeBotAPI()
    await api.start()
    env = run_env(tmp_path, TELEGRAM_TOKEN=TOKEN, PERSONABOT_TELEGRAM__BASE_URL=api.base_url)
    try:
        async with started(sys.executable, "-m", "bot.cli", "run", "--console", cwd=ROOT, env=env) as bot:
            await bot.wait_for("scheduler: started")
            ada = FakeUser(42, "Ada")
            chat = FakeChat.private(ada)
            api.send(chat, ada, "/optin")
            api.send(chat, ada, "hello there")
            await api.wait_for(lambda: len(api.bot_messages(chat.id)) >= 2, timeout=60)
            await bot.say("hi from the terminal")
            await bot.wait_for(
                "", timeout=60, stdout=True
            )  # the console's reply, whatever the tiny model says
            code = await bot.stop()
    finally:
        await api.stop()
    log = await bot.log.done()
    assert code == 0, log
    for line in (
        "telegram: started",
        "console: started (channel local)",
        "discord: skipped: no DISCORD_TOKEN (nor discord.token or discord.token_file)",
        "persona tester: answering with the base model (no adapter active)",
        "persona pirate: answering with the base model (no adapter active)",
        "worker: started",
        "scheduler: started with",
        "SIGTERM: stopping",
        "stopped",
    ):
        assert line in log, f"{line!r} not in:\n{log}"
    assert "Traceback" not in log
    assert "Thank you" in api.bot_messages(chat.id)[0]["text"]  # /optin answered on Telegram
    assert api.bot_messages(chat.id)[1]["text"].strip()

    store = Store(f"sqlite:///{tmp_path / 'data' / 'personabot.db'}")
    try:
        report = await collect_status(store)
        async with store.transaction() as session:
            opted = (
                await session.execute(select(User.training_opt_in).where(User.platform == "telegram"))
            ).scalar_one()
            # The jobs the process's scheduler ran with, as its heartbeat recorded them.
            planned = (
                await session.execute(select(Heartbeat.detail).where(Heartbeat.kind == "scheduler"))
            ).scalar_one()["jobs"]
    finally:
        await store.close()
    states = {c["component"].split("@")[0]: c["state"] for c in report["components"]}
    assert states == {
        "adapter:console": "stopped",
        "adapter:telegram": "stopped",
        "worker": "stopped",
        "scheduler": "stopped",
    }
    assert report["queue"]["done"] == 2 and report["queue"]["pending"] == 0
    assert opted is True
    assert {"post:pirate:0", "retrain:tester"} <= set(planned)


async def test_run_answers_piped_input_then_exits(tmp_path: Path) -> None:
    env = run_env(tmp_path, PERSONABOT_SCHEDULER__ENABLED="false")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.cli", "run", "--console", "--channel", "pipe", cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(120):
        out, err = await proc.communicate(b"/help\nhello\n")
    assert proc.returncode == 0, err.decode()
    replies = out.decode().split("\n\n")
    assert replies[0].startswith("Commands: ") and "/optin" in replies[0] and "/optout" in replies[0]
    assert len(replies) == 2 and replies[1].strip()
    assert "scheduler: skipped: scheduler.enabled is false" in err.decode()
    assert "telegram: skipped: no TELEGRAM_TOKEN" in err.decode()


def test_run_with_nothing_to_run_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.cli import main

    monkeypatch.setenv("PERSONABOT_WORKER__ENABLED", "false")
    monkeypatch.setenv("PERSONABOT_SCHEDULER__ENABLED", "false")
    assert main(["run"]) == 2
    captured = capsys.readouterr()
    assert "telegram: skipped: no TELEGRAM_TOKEN" in captured.out
    assert captured.err.strip().splitlines()[-1].startswith("personabot: error: nothing to run")
    assert "Traceback" not in captured.err


def test_run_with_a_malformed_token_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bot.cli import main

    monkeypatch.setenv("PERSONABOT_WORKER__ENABLED", "false")
    monkeypatch.setenv("TELEGRAM_TOKEN", "not-a-token")
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert "telegram: the bot token is malformed" in err and "not-a-token" not in err


class Unstoppable(ScriptedBackend):
    """A backend that ignores the worker's request to stop between decode steps (a remote server)."""

    def __init__(self) -> None:
        super().__init__(lambda prompt: "a b c d e f g h i j k l", delay=0.1)
        self.finished = threading.Event()

    def generate_batch(self, requests, callbacks):  # type: ignore[no-untyped-def]
        try:
            return super().generate_batch(requests, callbacks)
        finally:
            self.finished.set()


async def test_stop_returns_unfinished_jobs_to_the_queue(store: Store) -> None:
    settings = load_settings(run={"stop_timeout_seconds": 0.2, "flush_timeout_seconds": 0.2})
    console = ConsoleAdapter("stop-test", user="ada", stdout=io.StringIO(), interactive=False)
    slow = Unstoppable()
    app = BotApp(settings, store, PersonaRegistry.discover(), [console], slow, heartbeats=True)
    await app.start()
    result = await console.send("take your time")
    (job_id,) = result.job_ids
    async with asyncio.timeout(10):
        while True:
            async with store.transaction() as session:
                job = await session.get(ReplyJob, job_id)
            if job is not None and job.status == "running":
                break
            await asyncio.sleep(0.02)
    await app.stop()
    async with store.transaction() as session:
        job = await session.get(ReplyJob, job_id)
    assert job is not None
    assert (job.status, job.attempts, job.lease_owner) == ("pending", 0, None)
    # The generation that could not be stopped ends later: its reply is not written (the lease is gone).
    assert await asyncio.to_thread(slow.finished.wait, 10)
    await asyncio.sleep(0.3)
    async with store.transaction() as session:
        job = await session.get(ReplyJob, job_id)
        replies = (await session.execute(select(Message).where(Message.role == "assistant"))).all()
    assert job is not None and job.status == "pending" and replies == []
    report = await collect_status(store)
    assert report["queue"]["pending"] == 1 and report["queue"]["oldest_pending"]["id"] == job_id
    assert {c["state"] for c in report["components"]} == {"stopped"}
    json.dumps(report)  # `status --json` can print it
