"""Webhook mode: Telegram POSTs updates to the bot, which checks the secret token on every request."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters.telegram import TelegramAdapter
from bot.config import load_settings
from bot.errors import ConfigError, PersonabotError
from bot.store import Store
from bot.store.models import Message
from tests.fakes.telegram_harness import running_bot
from tests.fakes.telegram_server import TOKEN, FakeBotAPI, FakeChat, FakeUser

ADA = FakeUser(42, "Ada", "ada")
SECRET = "s3cret-Token_for-webhooks"


@pytest.fixture
async def api() -> AsyncIterator[FakeBotAPI]:
    server = FakeBotAPI()
    await server.start()
    yield server
    await server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def webhook_options(port: int) -> dict[str, Any]:
    return {
        "mode": "webhook",
        "webhook_url": "https://bot.example.test/tg/hook",
        "webhook_listen": "127.0.0.1",
        "webhook_port": port,
        "webhook_secret": SECRET,
    }


async def test_webhook_accepts_updates_with_the_secret_and_refuses_the_rest(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    port = free_port()
    hook = f"http://127.0.0.1:{port}/tg/hook"
    chat = FakeChat.private(ADA)
    async with running_bot(sqlite_store, api, tmp_path, **webhook_options(port)) as bot:
        # Telegram was told where to send updates, with the secret, and polling never started.
        assert api.webhook["url"] == "https://bot.example.test/tg/hook"
        assert api.webhook["secret_token"] == SECRET
        assert api.webhook["allowed_updates"] == ["message", "edited_message"]
        assert api.calls_of("getUpdates") == []

        async with httpx.AsyncClient() as client:
            forged = {"update_id": 1, "message": api.message(chat, ADA, "forged, no secret")}
            no_secret = await client.post(hook, json=forged)
            wrong = {"update_id": 2, "message": api.message(chat, ADA, "forged, wrong secret")}
            wrong_secret = await client.post(
                hook, json=wrong, headers={"X-Telegram-Bot-Api-Secret-Token": "not-the-secret"}
            )
            real = {"update_id": 3, "message": api.message(chat, ADA, "hello over the webhook")}
            right = await client.post(hook, json=real, headers={"X-Telegram-Bot-Api-Secret-Token": SECRET})
        assert (no_secret.status_code, wrong_secret.status_code, right.status_code) == (403, 403, 200)

        (reply,) = await bot.reply_in(ADA.id)
        assert reply["text"] == "echo -> hello over the webhook"
        assert [m.text for m in await bot.rows(Message, Message.role == "user")] == ["hello over the webhook"]


async def test_webhook_config_problems_are_one_clear_line(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    port = free_port()
    with pytest.raises(PersonabotError, match=r"^telegram\.webhook_secret: required in webhook mode"):
        async with running_bot(
            sqlite_store, api, tmp_path, **{**webhook_options(port), "webhook_secret": None}
        ):
            pass
    with pytest.raises(PersonabotError, match=r"^telegram\.webhook_url: "):
        async with running_bot(sqlite_store, api, tmp_path, **{**webhook_options(port), "webhook_url": None}):
            pass
    # The port is taken: the error says which address, and nothing is left running.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(
            PersonabotError, match=rf"cannot start the webhook on 127\.0\.0\.1:{port}"
        ) as info:
            async with running_bot(sqlite_store, api, tmp_path, **webhook_options(port)):
                pass
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://bot.example.test/hook", "must be a public https:// URL"),
        ("https://bot.example.test:8080/hook", "port 8080 is not one Telegram sends webhooks to"),
        ("https:///hook", "must be a public https:// URL"),
    ],
)
def test_a_webhook_url_telegram_would_not_call_is_a_config_error(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"^environment: telegram\.webhook_url: Value error, {problem}"):
        load_settings(telegram={"mode": "webhook", "webhook_url": url})
    with pytest.raises(ConfigError, match=rf"^telegram\.webhook_url: {problem}"):
        TelegramAdapter(TOKEN, mode="webhook", webhook_url=url, webhook_secret=SECRET)._check_config()


@pytest.mark.parametrize("port", ["", ":443", ":80", ":88", ":8443"])
def test_the_webhook_ports_telegram_calls_are_accepted(port: str) -> None:
    settings = load_settings(telegram={"mode": "webhook", "webhook_url": f"https://bot.example.test{port}/h"})
    assert settings.telegram.webhook_url == f"https://bot.example.test{port}/h"
