"""Starting the Telegram adapter: token problems are one clear line; the token never reaches a log."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from adapters.telegram import TelegramAdapter
from bot.backoff import backoff
from bot.commands import COMMAND_MENU
from bot.config import load_settings
from bot.errors import PersonabotError
from bot.events import DispatchResult, Incoming, Outgoing, PlatformEvent
from bot.logs import setup_logging
from bot.store import Store
from tests.fakes.telegram_harness import running_bot
from tests.fakes.telegram_server import TOKEN, FakeBotAPI, FakeChat, FakeUser

ADA = FakeUser(42, "Ada", "ada")
OTHER_TOKEN = "987654321:AAGsomeOtherTokenTheFakeDoesNotKnow_xyz"


@pytest.fixture
async def api() -> AsyncIterator[FakeBotAPI]:
    server = FakeBotAPI()
    await server.start()
    yield server
    await server.stop()


async def _ignore(event: PlatformEvent) -> DispatchResult:
    return DispatchResult()


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (None, r"^telegram: no bot token; set TELEGRAM_TOKEN, telegram\.token or telegram\.token_file$"),
        ("  ", r"^telegram: no bot token"),
        ("not-a-token", r"^telegram: the bot token is malformed"),
    ],
)
async def test_a_missing_or_malformed_token_is_one_line(
    token: str | None, expected: str, api: FakeBotAPI
) -> None:
    adapter = TelegramAdapter(token, base_url=api.base_url)
    with pytest.raises(PersonabotError, match=expected) as info:
        await adapter.start(_ignore)
    assert "\n" not in str(info.value)
    assert api.calls == []  # rejected before any request


async def test_a_token_the_bot_api_rejects_is_one_line_without_the_token(api: FakeBotAPI) -> None:
    adapter = TelegramAdapter(OTHER_TOKEN, base_url=api.base_url, network_retries=0)
    with pytest.raises(PersonabotError, match=r"^telegram: the Bot API rejected the bot token") as info:
        await adapter.start(_ignore)
    assert OTHER_TOKEN not in str(info.value) and "987654321" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


async def test_an_unreachable_bot_api_is_one_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    adapter = TelegramAdapter(
        TOKEN, base_url=f"http://127.0.0.1:{port}/bot", network_retries=1, retry_backoff=0.01
    )
    with pytest.raises(
        PersonabotError, match=rf"^telegram: cannot reach the Bot API at http://127\.0\.0\.1:{port}"
    ):
        await adapter.start(_ignore)


def test_from_settings_reads_the_token_and_the_telegram_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEGRAM_TOKEN", TOKEN)
    settings = load_settings(
        telegram={
            "mode": "webhook",
            "webhook_url": "https://x.test/hook",
            "streaming": True,
            "base_url": "http://h/bot",
        }
    )
    adapter = TelegramAdapter.from_settings(settings)
    assert adapter.platform == "telegram" and adapter.mode == "webhook" and adapter.streaming
    assert adapter.base_url == "http://h/bot" and adapter.base_file_url == "http://h/file/bot"
    assert adapter._token == TOKEN


@pytest.fixture
def real_logging() -> Iterator[None]:
    """`setup_logging` replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore", "telegram")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)


async def _exercise(api: FakeBotAPI) -> None:
    """Start, receive a message, reply, stop; then fail to start with a rejected token."""
    received: list[Incoming] = []

    async def on_event(event: PlatformEvent) -> DispatchResult:
        assert isinstance(event, Incoming)
        received.append(event)
        return DispatchResult(notice="noted")

    adapter = TelegramAdapter(TOKEN, base_url=api.base_url, retry_backoff=0.01)
    await adapter.start(on_event)
    api.send(FakeChat.private(ADA), ADA, "hi")
    await api.wait_for(lambda: bool(api.bot_messages(ADA.id)))
    api.fail("sendMessage", 502, times=1)  # a retried 5xx is logged too
    await adapter.deliver(Outgoing(1, received[0].channel, "a reply"))
    await adapter.stop_receiving()
    await adapter.stop()
    with pytest.raises(PersonabotError):
        await TelegramAdapter(OTHER_TOKEN, base_url=api.base_url, network_retries=0).start(on_event)


async def test_the_token_never_reaches_the_log_output(
    api: FakeBotAPI, real_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("DEBUG")
    logging.getLogger("httpx").setLevel(logging.DEBUG)  # request URLs, with the token in their path
    await _exercise(api)
    err = capsys.readouterr().err
    assert "/bot***/getMe" in err and "/bot***/sendMessage" in err  # the URLs were logged, redacted
    assert "retrying" in err
    for secret in (TOKEN, OTHER_TOKEN, TOKEN.split(":")[1], OTHER_TOKEN.split(":")[1]):
        assert secret not in err


async def test_the_token_is_redacted_for_any_handler(
    api: FakeBotAPI, caplog: pytest.LogCaptureFixture
) -> None:
    # caplog's handler has no redacting filter; the adapter guards the loggers themselves.
    caplog.set_level(logging.DEBUG)
    await _exercise(api)
    assert "/bot***/getMe" in caplog.text
    for secret in (TOKEN, OTHER_TOKEN):
        assert secret.split(":")[1] not in caplog.text


async def test_the_command_menu_is_set_once(api: FakeBotAPI) -> None:
    for _ in range(2):
        adapter = TelegramAdapter(TOKEN, base_url=api.base_url, retry_backoff=0.01)
        await adapter.start(_ignore)
        await adapter.stop()
    assert [(c["command"], c["description"]) for c in api.commands] == list(COMMAND_MENU.items())
    assert {"persona", "forget", "optout"} <= set(COMMAND_MENU)
    assert len(api.calls_of("setMyCommands")) == 1  # the second start found the menu unchanged


async def test_a_second_poller_on_the_token_stops_this_process_with_a_clear_reason(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    """Two processes polling one token only steal each other's updates: after `conflict_seconds` of
    409 Conflict the adapter gives up, and the watchdog stops the process (exit 3 under `run`)."""

    async def other_instance() -> None:
        async with httpx.AsyncClient() as client:
            while True:
                await client.post(f"{api.base_url}{TOKEN}/getUpdates", data={"timeout": "1"})

    async with running_bot(sqlite_store, api, tmp_path, conflict_seconds=1.0) as bot:
        rival = asyncio.create_task(other_instance())
        try:
            await asyncio.wait_for(bot.app.failed.wait(), 15)
        finally:
            rival.cancel()
        assert bot.app.failure is not None
        assert "another process kept polling with this bot token" in bot.app.failure
        assert "only one may poll" in bot.app.failure


async def test_polling_failures_back_off_with_the_one_helper_and_start_over_once_it_works(
    api: FakeBotAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """getUpdates failing three times waits `retry_backoff` doubling (bot.backoff, unjittered, 30 s
    cap), and a failure after a good poll starts from `retry_backoff` again."""
    import adapters.telegram as telegram

    waits: list[tuple[int, float]] = []

    def recording(attempt: int, **kwargs: object) -> float:
        delay = backoff(attempt, **kwargs)  # type: ignore[arg-type]
        waits.append((attempt, delay))
        return delay

    monkeypatch.setattr(telegram, "backoff", recording)
    api.fail("getUpdates", 502, times=3, description="Bad Gateway")
    adapter = TelegramAdapter(TOKEN, base_url=api.base_url, retry_backoff=0.02, poll_timeout=0.2)
    await adapter.start(_ignore)
    try:
        await api.wait_for(lambda: len(api.calls_of("getUpdates")) >= 5, 10)
        api.fail("getUpdates", 502, times=1, description="Bad Gateway")
        await api.wait_for(lambda: len(waits) >= 4, 10)
    finally:
        await adapter.stop()
    assert waits[:4] == [(1, 0.02), (2, 0.04), (3, 0.08), (1, 0.02)]
