"""The Discord adapter when Discord misbehaves: rate limits, outages, reconnects, redelivered events,
a crash mid-delivery, and sharding."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from bot.config import load_settings
from bot.events import utcnow
from bot.store import Store
from bot.store.models import Message, OutboxDelivery
from tests.fakes.discord_harness import (
    build_world,
    fake_discord,
    mention,
    scripted,
    start_bot,
)
from tests.fakes.discord_server import FakeDiscord


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    async with fake_discord(monkeypatch) as server:
        yield server


async def test_429_and_5xx_during_delivery_are_retried_and_posted_once(
    sqlite_store: Store, fake: FakeDiscord
) -> None:
    w = build_world(fake)
    messages = rf"/channels/{w.general['id']}/messages"
    bot = await start_bot(sqlite_store, fake)
    try:
        # Rate limited: discord.py waits Discord's retry_after and posts again.
        fake.fail_next("POST", messages, 429, retry_after=0.2)
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} first", mentions=[fake.bot])
        await bot.delivered(1)
        assert len(fake.calls("POST", messages)) == 2
        assert [m["content"] for m in fake.posted(w.general)] == ["echo -> first"]

        # An outage (503) fails the delivery; the outbox retries it with backoff.
        fake.fail_next("POST", messages, 503)
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} second", mentions=[fake.bot])
        await bot.delivered(2)
        assert len(fake.calls("POST", messages)) == 4
        assert [m["content"] for m in fake.posted(w.general)][1:] == ["echo -> second"]
        (failed_once,) = await bot.rows(OutboxDelivery, OutboxDelivery.attempts == 2)
        assert failed_once.status == "delivered"
    finally:
        await bot.stop()


async def test_a_failure_between_chunks_never_reposts_the_first(
    sqlite_store: Store, fake: FakeDiscord
) -> None:
    w = build_world(fake)
    messages = rf"/channels/{w.general['id']}/messages"
    long_reply = "First part of the answer. " * 100 + "\n\n" + "Second part. " * 100
    bot = await start_bot(sqlite_store, fake, backend=scripted(lambda _: long_reply.strip()))
    try:
        fake.fail_next("POST", messages, 502, skip=1)  # the second chunk fails once
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} tell me", mentions=[fake.bot])
        (row,) = await bot.delivered(1)
        posted = fake.posted(w.general)
        assert len(posted) == 2 and row.delivered_ids == [m["id"] for m in posted]
        assert len(fake.calls("POST", messages)) == 3  # chunk 1, chunk 2 failed, chunk 2 again
    finally:
        await bot.stop()


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (403, 50007, "Cannot send messages to this user"),
        (403, 50013, "Missing Permissions"),
        (404, 10003, "Unknown Channel"),
    ],
)
async def test_a_permanent_refusal_fails_the_row_at_once_with_its_code(
    sqlite_store: Store,
    fake: FakeDiscord,
    caplog: pytest.LogCaptureFixture,
    status: int,
    code: int,
    reason: str,
) -> None:
    """Closed DMs, missing permissions, an unknown channel: no retry can change them, so the reply
    fails on its first attempt, with Discord's code and words and the channel kept, logged and shown
    in `personabot status` (it used to be retried as if the error were temporary)."""
    from bot.status import collect_status, render_status

    w = build_world(fake)
    messages = rf"/channels/{w.general['id']}/messages"
    bot = await start_bot(sqlite_store, fake)
    try:
        fake.fail_next("POST", messages, status, code=code, message=reason, times=5)
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} hello", mentions=[fake.bot])
        async with asyncio.timeout(10):
            while not (failed := await bot.rows(OutboxDelivery, OutboxDelivery.status == "failed")):
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # time enough for a retry, were there one
        (row,) = failed
        assert row.attempts == 1 and len(fake.calls("POST", messages)) == 1
        assert row.error_code == f"{status}/{code}" and row.error == reason
        report = render_status(await collect_status(sqlite_store))
    finally:
        await bot.stop()
    channel = f"discord:{w.general['id']}"
    assert f"failed delivery {row.id} to {channel}: {status}/{code} {reason}" in report
    assert any(
        channel in r.getMessage() and f"{status}/{code}" in r.getMessage() and "not retried" in r.getMessage()
        for r in caplog.records
    )


async def test_gateway_reconnect_and_outage_resume_the_session(
    sqlite_store: Store, fake: FakeDiscord
) -> None:
    w = build_world(fake)
    bot = await start_bot(sqlite_store, fake)
    try:
        # op 7 RECONNECT: the client reconnects to resume_gateway_url and RESUMEs, no new IDENTIFY.
        await fake.reconnect()
        await fake.wait_until(lambda: fake.resume_count == 1)
        assert fake.gateway_paths == ["/gateway", "/resume-gateway"]
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} after reconnect", mentions=[fake.bot])
        await bot.replies(w.general, 1)

        # An outage: the socket drops and reconnecting fails for a while. A message sent meanwhile is
        # replayed when the session resumes, and answered.
        fake.gateway_down = True
        await fake.drop_connections()
        await fake.say(w.general, w.bob, f"{mention(fake.bot)} during the outage", mentions=[fake.bot])
        await fake.wait_until(lambda: len(fake.gateway_paths) >= 3)  # a refused attempt
        fake.gateway_down = False
        replies = await bot.replies(w.general, 2, timeout=15)
        assert replies[1]["content"] == "echo -> during the outage"
        assert fake.resume_count == 2 and fake.identify_count == 1
    finally:
        await bot.stop()


async def test_a_duplicated_message_create_is_stored_and_answered_once(
    sqlite_store: Store, fake: FakeDiscord
) -> None:
    w = build_world(fake)
    bot = await start_bot(sqlite_store, fake)
    try:
        message = await fake.say(w.general, w.alice, f"{mention(fake.bot)} once", mentions=[fake.bot])
        await fake.dispatch("MESSAGE_CREATE", message)  # Discord may deliver an event twice
        await fake.say(w.general, w.bob, f"{mention(fake.bot)} next", mentions=[fake.bot])
        await bot.delivered(2)
        await asyncio.sleep(0.2)  # time for a wrongly queued third reply to show up
        replies = sorted(m["content"] for m in fake.posted(w.general))
        assert replies == ["echo -> next", "echo -> once"]  # sorted
        stored = await bot.rows(Message, Message.role == "user")
        assert [m.text for m in stored] == ["once", "next"]
    finally:
        await bot.stop()


async def test_restart_delivers_an_undelivered_reply_exactly_once(store: Store, fake: FakeDiscord) -> None:
    """The bot crashes after Discord created its reply but before the answer arrived; after the
    restart the outbox row is delivered again, Discord dedupes it by nonce, and its id is recorded."""
    w = build_world(fake)
    messages = rf"/channels/{w.general['id']}/messages"
    first = await start_bot(store, fake)
    fake.hold_next("POST", messages)
    await fake.say(w.general, w.alice, f"{mention(fake.bot)} are you there?", mentions=[fake.bot])
    (created,) = await first.replies(w.general, 1)
    # Crash: no flush, no goodbye; the outbox row stays leased to the dead process.
    tasks = [t for t in (*first.app._pump_tasks, first.app._worker_task) if t is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await first.adapter.stop()
    (row,) = await first.rows(OutboxDelivery)
    assert row.status == "sending" and row.delivered_ids == []
    async with store.transaction() as session:  # the dead process's lease runs out
        await session.execute(update(OutboxDelivery).values(lease_expires_at=utcnow() - timedelta(seconds=1)))

    second = await start_bot(store, fake)
    try:
        (row,) = await second.delivered(1)
        assert fake.posted(w.general) == [created]
        assert row.delivered_ids == [created["id"]]
        (reply,) = await second.rows(Message, Message.role == "assistant")
        assert reply.platform_message_id == created["id"]
        nonces = [body["nonce"] for _, _, body in fake.calls("POST", messages)]
        assert len(nonces) == 2 and nonces[0] == nonces[1]
    finally:
        await second.stop()


async def test_sharded_client_from_one_setting(sqlite_store: Store, fake: FakeDiscord) -> None:
    fake.shard_count = 2  # what GET /gateway/bot recommends
    guilds = [fake.add_guild(f"guild {n}", guild_id=str((0x51000 + n) << 22 | 7)) for n in range(2)]
    alice = fake.add_user("alice", global_name="Alice")
    channels = []
    for guild in guilds:
        fake.add_member(guild, alice)
        channels.append(fake.add_channel(guild, "general"))
    settings = load_settings(worker={"poll_seconds": 0.05}, discord={"sharded": True})
    bot = await start_bot(sqlite_store, fake, settings=settings, identify_delay=0.0)
    try:
        assert sorted(s.shard for s in fake.sessions.values()) == [(0, 2), (1, 2)]
        for channel in channels:
            await fake.say(channel, alice, f"{mention(fake.bot)} hi shard", mentions=[fake.bot])
        for channel in channels:
            (reply,) = await bot.replies(channel, 1)
            assert reply["content"] == "echo -> hi shard"
    finally:
        await bot.stop()


async def test_many_shards_start_though_together_they_take_longer_than_the_ready_timeout(
    sqlite_store: Store, fake: FakeDiscord
) -> None:
    """Shards log in one after another (5 s apart on Discord); the ready timeout is per shard."""
    fake.shard_count = 4
    guilds = [fake.add_guild(f"guild {n}", guild_id=str((0x52000 + n) << 22 | 7)) for n in range(4)]
    alice = fake.add_user("alice", global_name="Alice")
    for guild in guilds:
        fake.add_member(guild, alice)
    channel = fake.add_channel(guilds[3], "general")
    settings = load_settings(worker={"poll_seconds": 0.05}, discord={"sharded": True})
    # 4 shards 0.6 s apart: about 2 s in all, more than the 1.2 s ready timeout.
    bot = await start_bot(sqlite_store, fake, settings=settings, identify_delay=0.6, ready_timeout=1.2)
    try:
        assert sorted(s.shard for s in fake.sessions.values()) == [(n, 4) for n in range(4)]
        await fake.say(channel, alice, f"{mention(fake.bot)} hi", mentions=[fake.bot])
        (reply,) = await bot.replies(channel, 1)
        assert reply["content"] == "echo -> hi"
    finally:
        await bot.stop()
