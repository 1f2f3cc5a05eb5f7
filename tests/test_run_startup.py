"""`personabot run` start-up: a bad token is reported before the model loads, and SIGTERM while the
model is pulled or loaded is a clean stop (exit 0), not a kill."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from adapters.discord import DiscordTokenError
from bot.config import load_settings
from bot.errors import PersonabotError
from bot.launch import run_bot
from tests.fakes.discord_harness import fake_discord
from tests.fakes.telegram_server import FakeBotAPI
from tests.processes import ROOT, started
from tests.test_run import run_env

REJECTED_TELEGRAM_TOKEN = "987654321:AAGsomeOtherTokenTheFakeDoesNotKnow_xyz"


def no_model_load(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded before the token was checked")


async def test_a_rejected_telegram_token_is_reported_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api = FakeBotAPI()
    await api.start()
    try:
        monkeypatch.setattr("bot.launch.load_backend", no_model_load)
        monkeypatch.setenv("TELEGRAM_TOKEN", REJECTED_TELEGRAM_TOKEN)
        settings = load_settings(telegram={"base_url": api.base_url})
        with pytest.raises(PersonabotError, match=r"^telegram: the Bot API rejected the bot token"):
            await run_bot(settings, say=lambda line: None)
        monkeypatch.setenv("TELEGRAM_TOKEN", "not a token")
        with pytest.raises(PersonabotError, match=r"^telegram: the bot token is malformed"):
            await run_bot(settings, say=lambda line: None)
    finally:
        await api.stop()


async def test_a_rejected_discord_token_is_reported_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async with fake_discord(monkeypatch) as fake:
        monkeypatch.setattr("bot.launch.load_backend", no_model_load)
        monkeypatch.setenv("DISCORD_TOKEN", "not.the.token-of-this-bot")
        settings = load_settings(discord={"api_base": fake.api_base, "gateway_url": fake.gateway_url})
        with pytest.raises(DiscordTokenError, match=r"^discord: the bot token was rejected"):
            await run_bot(settings, say=lambda line: None)


# `personabot run` with a model that takes a minute to load (a pull over a slow line, a big model).
SLOW_LOAD = textwrap.dedent(
    """
    import sys, time
    import bot.launch

    def slow_load(settings, allow_pull=False):
        print("loading the model", flush=True)
        time.sleep(60)

    bot.launch.load_backend = slow_load
    from bot.cli import main
    sys.exit(main(["run"]))
    """
)


async def test_sigterm_while_the_model_loads_exits_0(tmp_path: Path) -> None:
    env = run_env(tmp_path)
    async with started(sys.executable, "-c", SLOW_LOAD, cwd=ROOT, env=env, merge_stderr=True) as bot:
        await bot.wait_for("loading the model", timeout=60)
        code = await bot.stop(timeout=15)  # not the 60 s the load would take
    log = await bot.log.done()
    assert code == 0, log
    assert "SIGTERM: stopping" in log and "stopped before start-up finished" in log


def test_a_bot_process_without_a_worker_does_not_import_torch(tmp_path: Path) -> None:
    """A frontend (`worker.enabled = false`) restarted after a crash is back seconds sooner; it runs
    without torch installed (tests/test_bot_only_install.py runs the whole process so)."""
    import subprocess

    from tests.botonly import bot_only_python

    check = (
        "import sys, bot.cli, bot.launch, adapters.telegram, adapters.discord; print('torch' in sys.modules)"
    )
    python = bot_only_python(tmp_path / "venv")
    out = subprocess.run([python, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
