"""The pieces of the chaos run: real personabot processes, a load driver acting as Discord's users and
as Telegram's webhook sender, and a tally of what the fakes saw posted.

Processes (each a real `python -m bot.cli ...` on one PostgreSQL database):
- `personabot run` for Discord, against the fake Discord (`discord.api_base`, `discord.gateway_url`);
- `personabot run` for Telegram in webhook mode, against the fake Bot API; the driver POSTs updates to
  its webhook as Telegram does, retrying until it gets a 200;
- two `personabot worker` processes on a tiny real model (LocalBackend, greedy: fast and deterministic).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.fakes.discord_server import FakeDiscord
from tests.fakes.telegram_server import BOT_USERNAME, FakeBotAPI, FakeChat, FakeUser

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "chaos-webhook-secret"
PG_VERSION = os.listdir("/etc/postgresql")[0] if os.path.isdir("/etc/postgresql") else ""


def pg_ctl(action: str) -> None:
    """Stop or start the local PostgreSQL cluster (as CI's `.ci/run` starts it)."""
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, "main", action],
        check=True,
        capture_output=True,
        timeout=60,
    )


def pg_ready() -> bool:
    return (
        subprocess.run(
            ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-q"], check=False, timeout=10
        ).returncode
        == 0
    )


def ensure_pg_running() -> None:
    """Whatever happened, leave the server running: other tests (and other people) use it."""
    if not pg_ready():
        with contextlib.suppress(subprocess.CalledProcessError):
            pg_ctl("start")
        for _ in range(60):
            if pg_ready():
                return
            time.sleep(0.5)


def write_config(
    folder: Path,
    *,
    db_url: str,
    model: Path,
    personas: Path,
    discord: FakeDiscord,
    telegram: FakeBotAPI,
    port: int,
) -> Path:
    config = folder / "personabot.toml"
    config.write_text(
        f"""
database_url = "{db_url}"
data_dir = "{folder / "data"}"
personas_dir = "{personas}"
default_persona = "alpha"

[model]
path = "{model}"
device = "cpu"

[access]
user_cooldown_per_minute = 0
channel_cooldown_per_minute = 0

[worker]
enabled = false
max_batch = 8
poll_seconds = 0.1
retry_backoff_seconds = 0.5

[scheduler]
enabled = false

[discord]
api_base = "{discord.api_base}"
gateway_url = "{discord.gateway_url}"

[telegram]
mode = "webhook"
webhook_url = "https://bot.example.test/tg/hook"
webhook_listen = "127.0.0.1"
webhook_port = {port}
webhook_secret = "{WEBHOOK_SECRET}"
base_url = "{telegram.base_url}"
"""
    )
    return config


@dataclass
class Proc:
    """One personabot process, restartable, its output in a log file."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        handle = self.log.open("ab")
        handle.write(f"\n===== start {self.starts} =====\n".encode())
        handle.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    async def wait_for(self, text: str, timeout: float = 90.0) -> None:
        """Wait until the log of the current start shows `text`."""
        marker = f"===== start {self.starts} ====="
        async with asyncio.timeout(timeout):
            while text not in self.log.read_text(errors="replace").rsplit(marker, 1)[-1]:
                if not self.alive():
                    raise AssertionError(f"{self.name} exited:\n{self.tail()}")
                await asyncio.sleep(0.1)


def base_env(tmp: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PERSONABOT_") and k not in ("DISCORD_TOKEN", "TELEGRAM_TOKEN")
    }
    return env | {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "OMP_NUM_THREADS": "1",
    }


@dataclass
class Trigger:
    """One message that must be answered exactly once."""

    platform: str
    key: tuple[str, str]  # (channel id, message id) on its platform
    sent_at: float = 0.0  # when the user sent it (monotonic)
    answered_at: float | None = None
    tags: set[str] = field(default_factory=set)


class Tally:
    """Reads the fakes: every post the bot made, counted per triggering message, first seen when."""

    def __init__(self, discord: FakeDiscord, telegram: FakeBotAPI) -> None:
        self.discord = discord
        self.telegram = telegram
        self.triggers: dict[tuple[str, tuple[str, str]], Trigger] = {}
        self.seen: dict[str, float] = {}  # post id -> when the tally first saw it

    def add(self, trigger: Trigger) -> Trigger:
        self.triggers[(trigger.platform, trigger.key)] = trigger
        return trigger

    def posts(self) -> list[tuple[tuple[str, tuple[str, str]], str]]:
        """(the triggering message, the post's own id) for every reply the bot posted."""
        found = []
        for m in self.discord.posted():
            ref = (m.get("message_reference") or {}).get("message_id")
            if ref:
                found.append((("discord", (m["channel_id"], str(ref))), m["id"]))
        for m in self.telegram.bot_messages():
            ref = (m.get("reply_to_message") or {}).get("message_id")
            if ref is not None:
                chat = str(m["chat"]["id"])
                found.append((("telegram", (chat, str(ref))), f"{chat}/{m['message_id']}"))
        return found

    def counts(self) -> Counter[tuple[str, tuple[str, str]]]:
        return Counter(key for key, _ in self.posts())

    def scan(self) -> None:
        now = time.monotonic()
        for key, post in self.posts():
            self.seen.setdefault(post, now)
            trigger = self.triggers.get(key)
            if trigger is not None and trigger.answered_at is None:
                trigger.answered_at = now

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.scan()
            await asyncio.sleep(0.05)

    def unanswered(self) -> list[Trigger]:
        return [t for t in self.triggers.values() if t.answered_at is None]


class TelegramSender:
    """Telegram's side of the webhook: each chat's updates in order, each POSTed until it gets a 200."""

    def __init__(self, api: FakeBotAPI, url: str) -> None:
        self.api = api
        self.url = url
        self._ids = itertools.count(50_000)
        self._queues: dict[int, asyncio.Queue[tuple[dict[str, Any], Trigger]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.attempts: Counter[int] = Counter()  # update id -> POSTs made
        self.refused: Counter[int] = Counter()  # update id -> POSTs without a 200
        self.client = httpx.AsyncClient(timeout=20.0)
        self.last_update_id = 0

    def send(self, chat: FakeChat, user: FakeUser, text: str, trigger: Trigger | None = None) -> Trigger:
        mention = f"@{BOT_USERNAME}"
        msg = self.api.message(
            chat,
            user,
            f"{mention} {text}",
            entities=[{"type": "mention", "offset": 0, "length": len(mention)}],
        )
        trigger = trigger or Trigger("telegram", (str(chat.id), str(msg["message_id"])))
        trigger.key = (str(chat.id), str(msg["message_id"]))
        trigger.sent_at = time.monotonic()
        if chat.id not in self._queues:
            self._queues[chat.id] = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._run(self._queues[chat.id])))
        self.last_update_id = next(self._ids)
        self._queues[chat.id].put_nowait(({"update_id": self.last_update_id, "message": msg}, trigger))
        return trigger

    async def _run(self, queue: asyncio.Queue[tuple[dict[str, Any], Trigger]]) -> None:
        while True:
            update, _ = await queue.get()
            delay = 0.2
            while True:
                self.attempts[update["update_id"]] += 1
                try:
                    response = await self.client.post(
                        self.url, json=update, headers={"X-Telegram-Bot-Api-Secret-Token": WEBHOOK_SECRET}
                    )
                    if response.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                self.refused[update["update_id"]] += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            queue.task_done()

    def idle(self) -> bool:
        return all(q.empty() and q._unfinished_tasks == 0 for q in self._queues.values())  # type: ignore[attr-defined]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]
