"""Bad input and bad configuration: odd Discord messages never crash the bot, a bad token is one
clear line at start-up, and the token never reaches a log."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest

from adapters.discord import DiscordAdapter, DiscordError, DiscordTokenError, clean_text
from bot.config import load_settings
from bot.events import DispatchResult, PlatformEvent
from bot.logs import setup_logging
from bot.store import Store
from bot.store.models import Channel, Message
from tests.fakes.discord_harness import (
    build_world,
    fake_discord,
    mention,
    start_bot,
)
from tests.fakes.discord_server import FakeDiscord


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    async with fake_discord(monkeypatch) as server:
        yield server


async def ignore(_: PlatformEvent) -> DispatchResult:
    return DispatchResult()


def attachment(name: str) -> dict[str, object]:
    return {"id": "1", "filename": name, "size": 10, "url": "http://x/y", "proxy_url": "http://x/y"}


async def test_odd_messages_never_crash_the_bot(
    store: Store, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    w = build_world(fake)
    mystery = fake.add_channel(w.guild, "mystery", type=99)  # a channel type discord.py does not know
    dm = fake.open_dm(w.alice)
    old_thread = fake.add_thread(w.general, "old thread", announced=False)  # not in discord.py's cache
    bot = await start_bot(store, fake)
    at_bot = f"{mention(fake.bot)} "
    try:
        await fake.say(dm, w.alice, "")  # empty
        await fake.say(dm, w.alice, "", embeds=[{"type": "rich", "title": "a card"}])  # embeds only
        await fake.say(dm, w.alice, "\u200b\u200d\u2060")  # only invisible characters
        await fake.say(dm, w.alice, "", attachments=[attachment("cat.png")])  # attachments only
        await fake.say(dm, w.alice, "", sticker_items=[{"id": "5", "name": "wave", "format_type": 1}])
        await fake.say(dm, w.alice, "joined", type=7)  # a system message (member joined)
        await fake.say(dm, w.alice, "y" * 2000)  # at the limit: its echo needs two messages
        await fake.say(w.general, w.alice, at_bot + "שלום עולם, مرحبا", mentions=[fake.bot])
        await fake.say(w.general, w.alice, at_bot + "broken \ud800 surrogate", mentions=[fake.bot])
        await fake.say(
            w.general, w.alice, at_bot + "nul\x00byte and <@42> and <#7> <:blob:99>", mentions=[fake.bot]
        )
        await fake.say(mystery, w.alice, at_bot + "in a mystery channel", mentions=[fake.bot])
        await fake.say(old_thread, w.alice, at_bot + "in an old thread", mentions=[fake.bot])
        await fake.say(dm, w.alice, "still there?")
        replies = [r["content"] for r in await bot.replies(dm, 5)]
        assert all(len(r) <= 2000 for r in replies)
        # Replies to different messages may finish in any order; the long one is two messages.
        assert {"echo -> [attachment: cat.png]", "echo -> [sticker: wave]", "echo -> still there?"} < set(
            replies
        )
        long_index = replies.index("echo ->")
        assert replies[long_index + 1] == "y" * 2000
        general = [m["content"] for m in await bot.replies(w.general, 3)]
        assert "echo -> שלום עולם, مرحبا" in general
        (in_mystery,) = await bot.replies(mystery, 1)
        assert in_mystery["content"] == "echo -> in a mystery channel"
        (in_thread,) = await bot.replies(old_thread, 1)
        assert in_thread["content"] == "echo -> in an old thread"
        threads = await bot.rows(Channel, Channel.thread_id == old_thread["id"])
        assert [(c.external_id, c.title) for c in threads] == [(w.general["id"], "old thread")]

        texts = [m.text for m in await bot.rows(Message, Message.role == "user")]
        assert "broken \ufffd surrogate" in texts
        assert "nulbyte and @unknown-user and #unknown-channel :blob:" in texts
        assert "y" * 2000 in texts
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    finally:
        await bot.stop()


def test_clean_text_mends_surrogates_and_drops_nul() -> None:
    assert clean_text("a\ud83d\ude00b") == "a😀b"  # a pair split in two escapes is joined again
    assert clean_text("x\udc00y\x00") == "x\ufffdy"
    assert clean_text("שלום\u200f") == "שלום\u200f"


async def test_a_missing_token_is_one_clear_line() -> None:
    adapter = DiscordAdapter.from_settings(load_settings())
    with pytest.raises(DiscordTokenError) as error:
        await adapter.start(ignore)
    message = str(error.value)
    assert "\n" not in message and "DISCORD_TOKEN" in message


async def test_a_token_with_spaces_is_refused_before_connecting() -> None:
    adapter = DiscordAdapter("abc def.ghi")
    with pytest.raises(DiscordTokenError, match="spaces or control characters"):
        await adapter.start(ignore)


async def test_a_rejected_token_is_one_clear_line_without_the_token(fake: FakeDiscord) -> None:
    wrong = "wrong.discord.token-9876543210"
    adapter = DiscordAdapter(wrong, api_base=fake.api_base, gateway_url=fake.gateway_url)
    with pytest.raises(DiscordTokenError) as error:
        await adapter.start(ignore)
    message = str(error.value)
    assert "rejected" in message and "\n" not in message and wrong not in message
    assert fake.calls("GET", "/users/@me")  # it asked Discord, which said no


async def test_a_missing_message_content_intent_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    async with fake_discord(monkeypatch, message_content_allowed=False) as server:
        adapter = DiscordAdapter.from_settings(
            load_settings(), api_base=server.api_base, gateway_url=server.gateway_url
        )
        with pytest.raises(DiscordError, match="Message Content intent") as error:
            await adapter.start(ignore)
        assert "\n" not in str(error.value)


async def test_the_token_never_reaches_a_log(
    sqlite_store: Store,
    fake: FakeDiscord,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("DEBUG")  # the handler `personabot run` installs, with its redacting filter
    root.handlers.insert(0, caplog.handler)  # caplog first: it sees records before any redaction
    for name in ("discord", "discord.gateway", "discord.http", "adapters.discord"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        w = build_world(fake)
        bot = await start_bot(sqlite_store, fake)
        fake.fail_next("POST", r"/channels/\d+/messages", 429, retry_after=0.05)
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} hello", mentions=[fake.bot])
        await bot.replies(w.general, 1)
        await fake.reconnect()  # RESUME sends the token again
        await fake.wait_until(lambda: fake.resume_count == 1)
        await bot.stop()
        with pytest.raises(DiscordTokenError):
            await DiscordAdapter("another.secret-token-value", api_base=fake.api_base).start(ignore)

        # Nothing personabot or discord.py logged carries a token, even before redaction.
        messages = [r.getMessage() for r in caplog.records]
        assert any("RESUMED" in m for m in messages)  # DEBUG logging was really on
        assert not [m for m in messages if fake.token in m or "another.secret-token-value" in m]
        # And if something did, the real handler would print *** instead.
        logging.getLogger("adapters.discord").warning("leaked %s", fake.token)
        printed = capsys.readouterr().err
        assert "leaked ***" in printed and fake.token not in printed
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
