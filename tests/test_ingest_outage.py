"""No incoming message is lost while the database is unreachable: events wait in the ingest spool
(memory and a local file), are stored in order once the database is back, survive a crash of the
process, and Telegram updates are confirmed only once stored or spooled.

The outage is real: PostgreSQL is reached through a TCP proxy that the test takes down (every
connection reset, new ones refused) and brings back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from bot.spool import spool_report
from bot.status import collect_status, render_status
from bot.store import Store
from bot.store.models import Message
from tests.fakes.tcp_proxy import TcpProxy
from tests.fakes.telegram_harness import running_bot
from tests.fakes.telegram_server import FakeBotAPI, FakeChat, FakeUser

pytestmark = [pytest.mark.postgres, pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]

ADA = FakeUser(42, "Ada", "ada")
BOB = FakeUser(43, "Bob", "bob")


@pytest.fixture
async def api() -> AsyncIterator[FakeBotAPI]:
    server = FakeBotAPI()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(db_url: str) -> AsyncIterator[TcpProxy]:
    url = make_url(db_url)
    server = await TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    yield server
    await server.close()


@pytest.fixture
async def proxied(db_url: str, proxy: TcpProxy) -> AsyncIterator[Store]:
    """The test's (migrated) database, reached through the proxy."""
    url = make_url(db_url).set(host="127.0.0.1", port=proxy.port)
    s = Store(url.render_as_string(hide_password=False))
    await s.upgrade()
    yield s
    await s.close()


def confirmed(api: FakeBotAPI) -> int:
    """The highest update id the bot has confirmed (the offset of its last getUpdates, minus one)."""
    offsets = [c.int("offset") or 0 for c in api.calls_of("getUpdates")]
    return max(offsets, default=0) - 1


def answer_in_order(replies: list[dict], messages: list[str]) -> bool:
    """One reply per message, in order: each echoes its message last (a prompt joins one user's
    consecutive lines, so a reply may echo the earlier ones too)."""
    texts = [r["text"] for r in replies]
    return len(texts) == len(messages) and all(t.endswith(m) for t, m in zip(texts, messages, strict=True))


async def test_messages_during_an_outage_are_answered_once_in_order_after_it(
    proxied: Store, proxy: TcpProxy, api: FakeBotAPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ada, bob = FakeChat.private(ADA), FakeChat.private(BOB)
    async with running_bot(proxied, api, tmp_path) as bot:
        api.send(ada, ADA, "before")
        await bot.reply_in(ADA.id, 1)
        with caplog.at_level(logging.WARNING, logger="bot.ingest"):
            await proxy.down()
            sent = [api.push({"message": api.message(ada, ADA, f"ada {n}")}) for n in range(3)]
            sent += [api.push({"message": api.message(bob, BOB, "bob 0")})]
            # Telegram is told they arrived only once they are in the spool: on disk, not in the store.
            await api.wait_for(lambda: confirmed(api) >= sent[-1])
            (spool,) = spool_report(tmp_path / "data" / "spool")
            assert spool["events"] == 4 and spool["held"]
            await asyncio.sleep(1.0)  # the outage goes on: still one warning, not one per retry
            await proxy.up()
            await bot.reply_in(ADA.id, 4, timeout=20)
            await bot.reply_in(BOB.id, 1, timeout=20)
        assert answer_in_order(api.bot_messages(ADA.id), ["before", "ada 0", "ada 1", "ada 2"])
        stored = [m.text for m in await bot.user_messages(ADA.id)]
        assert stored == ["before", "ada 0", "ada 1", "ada 2"]
        warnings = [r.getMessage() for r in caplog.records if r.name == "bot.ingest"]
        assert len(warnings) == 2, warnings
        assert "unreachable" in warnings[0] and "reachable again" in warnings[1]
        assert spool_report(tmp_path / "data" / "spool") == []
        await asyncio.sleep(0.3)
        assert len(api.bot_messages(ADA.id)) == 4  # nothing answered twice


async def test_the_spool_outlives_a_crash_and_is_replayed_at_the_next_start(
    proxied: Store, proxy: TcpProxy, api: FakeBotAPI, tmp_path: Path
) -> None:
    ada = FakeChat.private(ADA)
    async with running_bot(proxied, api, tmp_path) as first:
        await proxy.down()
        last = [api.push({"message": api.message(ada, ADA, f"lost? {n}")}) for n in range(2)][-1]
        await api.wait_for(lambda: confirmed(api) >= last)
        # Crash: the process is gone without a goodbye (its spool file stays, its lock goes).
        tasks = [t for t in (first.app.ingest._task, first.adapter._poller) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert first.app.ingest._file is not None
        first.app.ingest._file._file.close()
        first.app.ingest._file = None
        first.adapter._receiving = False
        first.adapter._poller = None
        spool_dir = tmp_path / "data" / "spool"
        (left,) = spool_report(spool_dir)
        assert left["events"] == 2 and not left["held"]
        await proxy.up()  # (so the rest of this process stops cleanly; its spool is not touched)

    async with running_bot(proxied, api, tmp_path) as second:
        replies = await second.reply_in(ADA.id, 2, timeout=20)
        assert answer_in_order(replies, ["lost? 0", "lost? 1"])
        report = await collect_status(proxied, spool_dir=spool_dir)
        assert report["spool"] == []
        assert "ingest spool (events waiting for the database):\n  empty" in render_status(report)


async def test_a_full_spool_leaves_the_update_unconfirmed_so_telegram_sends_it_again(
    proxied: Store, proxy: TcpProxy, api: FakeBotAPI, tmp_path: Path
) -> None:
    ada = FakeChat.private(ADA)
    async with running_bot(proxied, api, tmp_path) as bot:
        bot.app.ingest.max_events = 1
        await proxy.down()
        first = api.push({"message": api.message(ada, ADA, "kept")})
        second = api.push({"message": api.message(ada, ADA, "refused, then sent again")})
        await api.wait_for(lambda: confirmed(api) >= first)
        await asyncio.sleep(0.5)
        assert confirmed(api) < second  # not stored, not kept: not confirmed
        await proxy.up()
        replies = await bot.reply_in(ADA.id, 2, timeout=20)
        assert answer_in_order(replies, ["kept", "refused, then sent again"])
        assert [m.text for m in await bot.rows(Message, Message.role == "user")] == [
            "kept",
            "refused, then sent again",
        ]


async def test_discord_messages_during_an_outage_are_answered_after_it(
    proxied: Store, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fakes.discord_harness import build_world, fake_discord, mention, start_bot

    async with fake_discord(monkeypatch) as fake:
        w = build_world(fake)
        bot = await start_bot(proxied, fake)
        try:
            await proxy.down()
            for n in range(2):
                await fake.say(w.general, w.alice, f"{mention(fake.bot)} during {n}", mentions=[fake.bot])
            response = await fake.slash(w.general, w.bob, "help")
            assert "catching up" in response["data"]["content"]
            await asyncio.sleep(0.5)
            assert bot.app.ingest.waiting == 3
            await proxy.up()
            replies = await bot.replies(w.general, 3, timeout=20)
            texts = [r["content"] for r in replies]
            assert [t for t in texts if t.startswith("echo")] == [
                "echo -> during 0",
                "echo -> during 1",
            ]
            assert any(t.startswith("Commands: ") for t in texts)  # the command's answer, late
        finally:
            await bot.stop()


async def test_a_process_started_while_the_database_is_down_waits_for_it(
    db_url: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """`personabot run` / `worker` restarted during a database restart wait instead of exiting 1."""
    from bot.config import load_settings
    from bot.runtime import open_store

    url = make_url(db_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = load_settings(database_url=url)
    await proxy.down()
    with pytest.raises(Exception) as refused:
        await open_store(settings)  # one-shot commands still fail at once
    assert "Connect call failed" in str(refused.value) or "refused" in str(refused.value).lower()
    asyncio.get_running_loop().call_later(1.5, lambda: asyncio.ensure_future(proxy.up()))
    with caplog.at_level(logging.WARNING, logger="bot.runtime"):
        store = await open_store(settings, wait_seconds=30)
    await store.close()
    assert [r.getMessage() for r in caplog.records if r.name == "bot.runtime"] == [
        "the database is unreachable (ConnectionRefusedError); waiting up to 30 s for it"
    ]
