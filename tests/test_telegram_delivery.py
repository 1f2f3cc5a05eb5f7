"""Delivering replies on Telegram: splitting, streaming edits, flood control, retries, restarts."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from bot.events import ChannelKind, ChannelRef, Outgoing, utcnow
from bot.store import Store, outbox
from bot.store.models import OutboxDelivery
from bot.streaming import ActiveReply, StreamingRelay
from tests.fakes.backend import ScriptedBackend
from tests.fakes.telegram_harness import running_bot
from tests.fakes.telegram_server import FakeBotAPI, FakeChat, FakeUser, utf16_len

ADA = FakeUser(42, "Ada", "ada")
CHAT = FakeChat.private(ADA)


@pytest.fixture
async def api() -> AsyncIterator[FakeBotAPI]:
    server = FakeBotAPI()
    await server.start()
    yield server
    await server.stop()


def long_reply() -> str:
    """About 9,600 UTF-16 units in paragraphs; emoji count twice, as Telegram counts them."""
    paragraph = " ".join(f"Sentence {i} of this paragraph 🙂 goes on a little." for i in range(20))
    return "\n\n".join(f"{n}. {paragraph}" for n in range(9))


async def test_long_replies_are_split_under_4096_utf16_units(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    text = long_reply()
    backend = ScriptedBackend(lambda prompt: text)
    async with running_bot(sqlite_store, api, tmp_path, backend=backend) as bot:
        api.send(CHAT, ADA, "tell me a long story")
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1)
        posted = [m["text"] for m in api.bot_messages(CHAT.id)]
    assert len(posted) == 3
    assert all(utf16_len(p) <= 4096 for p in posted)
    assert all(len(p) < 4096 for p in posted) and max(utf16_len(p) for p in posted) > 3500
    assert "\n\n".join(posted) == text  # cut at paragraph boundaries, nothing lost
    (row,) = await bot.rows(OutboxDelivery)
    assert row.delivered_ids == [str(m["message_id"]) for m in api.bot_messages(CHAT.id)]


async def test_streaming_edits_one_message_throttled_by_growth_and_time(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    words = [f"word{i}" for i in range(60)]
    text = " ".join(words)
    backend = ScriptedBackend(lambda prompt: text, delay=0.01)
    async with running_bot(
        sqlite_store,
        api,
        tmp_path,
        backend=backend,
        streaming=True,
        stream_min_interval=0.03,
        stream_min_growth=60,
    ) as bot:
        api.send(CHAT, ADA, "stream it")
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1)
        sends, edits = api.calls_of("sendMessage"), api.calls_of("editMessageText")
        # One message: the first partial was posted, then edited, ending in the final text.
        ((msg,),) = [api.bot_messages(CHAT.id)]
        assert msg["text"] == text
        assert len([c for c in sends if c.int("chat_id") == CHAT.id]) == 1
        assert sends[0].params["text"].endswith(" …")
        assert edits and all(c.int("message_id") == msg["message_id"] for c in edits)
        # Throttled: far fewer edits than words; each streamed edit grew by at least 60 characters.
        streamed = [c.params["text"] for c in edits[:-1]]
        assert len(edits) <= len(text) // 60 + 2
        shown = [len(sends[0].params["text"])] + [len(t) for t in streamed]
        assert all(b - a >= 60 for a, b in itertools.pairwise(shown))
        assert edits[-1].params["text"] == text  # the marker is gone at the end
        assert api.calls_of("sendChatAction"), "typing is shown while generating"


async def test_streamed_reply_longer_than_a_message_edits_then_continues(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    # Three paragraphs of ~3,800 characters in long "words", streamed slowly enough to be previewed.
    text = "\n\n".join(" ".join([letter * 95] * 40) for letter in "abc")
    backend = ScriptedBackend(lambda prompt: text, delay=0.005)
    async with running_bot(
        sqlite_store,
        api,
        tmp_path,
        backend=backend,
        streaming=True,
        stream_min_interval=0.0,
        stream_min_growth=1500,
    ) as bot:
        api.send(CHAT, ADA, "a long one, streamed")
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1)
        posted = api.bot_messages(CHAT.id)
    assert "\n\n".join(m["text"] for m in posted) == text
    assert len(posted) == 3
    sends = api.calls_of("sendMessage")
    assert len(sends) == 3  # one preview (however fast the tokens came), then chunks 2 and 3
    assert sends[0].params["text"].endswith(" …")  # the preview became the first chunk
    assert posted[0]["message_id"] == 1 + 1  # Ada's message is 1; the preview is the bot's first
    edits = [c.params["text"] for c in api.calls_of("editMessageText")]
    assert len(edits) >= 2 and all(utf16_len(e) <= 4096 for e in edits)  # a preview never outgrows a message


# PTB's own RetryAfter constructor warns about its future timedelta type.
@pytest.mark.filterwarnings("ignore::telegram.warnings.PTBDeprecationWarning")
async def test_flood_control_429_is_waited_out_and_posted_once(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    api.fail("sendMessage", 429, retry_after=1)
    async with running_bot(sqlite_store, api, tmp_path) as bot:
        api.send(CHAT, ADA, "hello under flood control")
        await bot.reply_in(CHAT.id)
        await bot.settle()
    sends = [c for c in api.calls_of("sendMessage") if c.int("chat_id") == CHAT.id]
    assert len(sends) == 2  # the 429, then the retry
    assert sends[1].at - sends[0].at >= 1.0  # retry_after was honoured
    assert [m["text"] for m in api.bot_messages(CHAT.id)] == ["echo -> hello under flood control"]
    (row,) = await bot.rows(OutboxDelivery)
    assert row.status == "delivered" and row.attempts == 1


async def test_5xx_answers_are_retried_with_backoff(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    api.fail("sendMessage", 502, times=2, description="Bad Gateway")
    async with running_bot(sqlite_store, api, tmp_path) as bot:
        api.send(CHAT, ADA, "through a flaky gateway")
        await bot.reply_in(CHAT.id)
    assert len(api.calls_of("sendMessage")) == 3
    assert [m["text"] for m in api.bot_messages(CHAT.id)] == ["echo -> through a flaky gateway"]


async def test_a_group_upgraded_to_a_supergroup_gets_the_reply_at_its_new_id(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    group = FakeChat(-5, "group", "Old Group")
    api.fail(
        "sendMessage",
        400,
        description="Bad Request: group chat was upgraded to a supergroup chat",
        parameters={"migrate_to_chat_id": -1005},
    )
    async with running_bot(sqlite_store, api, tmp_path) as bot:
        api.send(group, ADA, "Polly, hello")
        (reply,) = await bot.reply_in(-1005)
    assert reply["text"] == "echo -> Polly, hello"
    assert api.bot_messages(group.id) == []


async def test_a_chunk_posted_before_a_failure_is_not_posted_again(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    text = long_reply()
    backend = ScriptedBackend(lambda prompt: text)
    # The second chunk fails past the adapter's retries; the outbox retries the row later.
    api.fail("sendMessage", 500, after=1, times=4)
    async with running_bot(sqlite_store, api, tmp_path, backend=backend, network_retries=3) as bot:
        api.send(CHAT, ADA, "long, over a bad line")
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1)
        posted = api.bot_messages(CHAT.id)
    assert "\n\n".join(m["text"] for m in posted) == text and len(posted) == 3
    (row,) = await bot.rows(OutboxDelivery)
    assert row.attempts == 2
    assert row.delivered_ids == [str(m["message_id"]) for m in posted]


async def test_an_undelivered_reply_is_sent_once_after_a_restart(
    store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    # First run: Telegram is down for sending; the reply stays in the outbox.
    api.fail("sendMessage", 500, times=10**6)
    async with running_bot(store, api, tmp_path, network_retries=0) as bot:
        api.send(CHAT, ADA, "are you there?")
        await bot.wait_until(lambda: bot.count(OutboxDelivery), 1)
    (row,) = await bot.rows(OutboxDelivery)
    assert row.status == "pending" and row.attempts >= 1
    assert api.bot_messages(CHAT.id) == []

    # Second run: Telegram is back; the reply goes out once, and a third run posts nothing more.
    api.clear_failures()
    async with running_bot(store, api, tmp_path) as bot:
        await bot.reply_in(CHAT.id)
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1)
    async with running_bot(store, api, tmp_path) as bot:
        await bot.settle()
    assert [m["text"] for m in api.bot_messages(CHAT.id)] == ["echo -> are you there?"]
    assert len(await bot.user_messages(CHAT.id)) == 1  # the update was not fetched twice either


class SlowAdapter:
    """Posting takes a while, as it does on a real network."""

    platform = "telegram"

    def __init__(self) -> None:
        self.posted: list[str] = []
        self.edits: list[str] = []

    async def deliver(self, reply: Outgoing) -> list[str]:
        await asyncio.sleep(0.05)
        self.posted.append(reply.text)
        return [str(len(self.posted))]

    async def preview(self, channel: ChannelRef, text: str, job_id: int) -> str:
        return (await self.deliver(Outgoing(outbox_id=1, channel=channel, text=text)))[0]

    async def edit(self, channel: ChannelRef, platform_message_id: str, text: str) -> None:
        await asyncio.sleep(0.05)
        self.edits.append(text)

    async def typing(self, channel: ChannelRef) -> None:
        return None


async def test_streaming_posts_one_preview_however_fast_tokens_arrive() -> None:
    adapter = SlowAdapter()
    relay = StreamingRelay(adapter, streaming=True, min_interval=0.0, min_growth=1)  # type: ignore[arg-type]
    reply = ActiveReply(1, ChannelRef("telegram", "42", ChannelKind.DIRECT), "parrot")
    await relay.on_start(reply)
    words = [f"w{i}" for i in range(50)]
    # Partials arrive faster than the platform answers, as the worker schedules them.
    await asyncio.gather(*(relay.on_text(reply, " ".join(words[: n + 1])) for n in range(len(words))))
    await relay.on_end(reply, True)
    await relay.on_text(reply, "a partial delivered after the end")
    assert len(adapter.posted) == 1
    assert relay.take_streamed(1) == "1"


@pytest.mark.parametrize(
    ("status", "description"),
    [(403, "Forbidden: bot was blocked by the user"), (400, "Bad Request: chat not found")],
)
async def test_a_refused_reply_fails_at_once_with_telegrams_words(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path, status: int, description: str
) -> None:
    """Telegram's final refusals are not retried: the row fails on its first attempt, code and words kept."""
    api.fail("sendMessage", status, description=description, times=5)
    async with running_bot(sqlite_store, api, tmp_path) as bot:
        api.send(CHAT, ADA, "hello?")
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "failed"), 1)
        await asyncio.sleep(0.3)  # time enough for a retry, were there one
    (row,) = await bot.rows(OutboxDelivery)
    assert row.attempts == 1 and len(api.calls_of("sendMessage")) == 1
    assert row.error_code == str(status) and row.error and description.lower().endswith(row.error.lower())


async def test_a_long_outage_is_retried_past_any_fixed_count_until_telegram_is_back(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    """502s for longer than the old 8 attempts: the reply is still posted, once, when Telegram recovers."""
    api.fail("sendMessage", 502, times=12, description="Bad Gateway")
    async with running_bot(sqlite_store, api, tmp_path, network_retries=0) as bot:
        api.send(CHAT, ADA, "still there?")
        await bot.wait_until(
            lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1, timeout=30
        )
    (row,) = await bot.rows(OutboxDelivery)
    assert row.attempts == 13
    assert [m["text"] for m in api.bot_messages(CHAT.id)] == ["echo -> still there?"]


async def test_a_transient_failure_past_the_deadline_fails_the_row(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    api.fail("sendMessage", 502, times=10**6, description="Bad Gateway")
    async with running_bot(sqlite_store, api, tmp_path, network_retries=0) as bot:
        for pump in bot.app.pumps:
            pump.settings = pump.settings.model_copy(update={"deadline_hours": 1 / 3600})
        api.send(CHAT, ADA, "anyone?")
        await bot.wait_until(
            lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "failed"), 1, timeout=15
        )
    (row,) = await bot.rows(OutboxDelivery)
    assert row.attempts > 1 and row.error is not None and row.error.startswith("still failing after")
    assert api.bot_messages(CHAT.id) == []


async def test_a_slow_answer_to_a_send_is_waited_for_and_posted_once(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    """Telegram posts the message but answers after the adapter's general request timeout: the send
    waits longer (`send_timeout`), so the reply is recorded once instead of timing out and being resent."""
    api.slow("sendMessage", 1.5)
    async with running_bot(sqlite_store, api, tmp_path, request_timeout=0.5) as bot:
        api.send(CHAT, ADA, "take your time")
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1)
        await asyncio.sleep(0.5)
    assert [m["text"] for m in api.bot_messages(CHAT.id)] == ["echo -> take your time"]
    (row,) = await bot.rows(OutboxDelivery)
    assert row.attempts == 1 and row.inflight_chunk is None


async def test_a_send_whose_answer_never_comes_is_not_resent(
    store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    """The answer to a send is lost (past `send_timeout`): the message may be posted, so the row is
    `unknown`, not retried; `personabot outbox retry` sends it again when an operator says so."""
    api.slow("sendMessage", 2.0)
    async with running_bot(store, api, tmp_path, send_timeout=0.5) as bot:
        api.send(CHAT, ADA, "hello?")
        async with asyncio.timeout(10):  # the send is out and its chunk marked before the request left
            while not await bot.count(OutboxDelivery, OutboxDelivery.inflight_chunk == 0):
                await asyncio.sleep(0.02)
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "unknown"), 1)
        await asyncio.sleep(2.0)  # the late answer comes and goes; nothing is sent again
        assert len(api.calls_of("sendMessage")) == 1 and len(api.bot_messages(CHAT.id)) == 1
        (row,) = await bot.rows(OutboxDelivery)
        assert "may have been posted" in (row.error or "")
        async with store.transaction() as session:
            assert await outbox.requeue(session, [row.id], deadline=timedelta(hours=1)) == [row.id]
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1)
    assert len(api.bot_messages(CHAT.id)) == 2  # the operator's choice


@pytest.mark.parametrize("answer", ["flood control", "5xx"])
async def test_no_chunk_is_marked_in_flight_while_a_refused_send_waits_to_be_retried(
    store: Store, api: FakeBotAPI, tmp_path: Path, answer: str
) -> None:
    """Telegram answered and did not post (429, 5xx): while the adapter waits to send again, the row
    marks nothing in flight, so a process killed in that wait (seconds under flood control) leaves a
    reply the next process sends, not an `unknown` one (the chaos run lost a reply that way)."""
    if answer == "flood control":
        api.fail("sendMessage", 429, retry_after=2)
        kw: dict[str, float] = {}
    else:
        api.fail("sendMessage", 502, description="Bad Gateway")
        kw = {"retry_backoff": 1.0}
    async with running_bot(store, api, tmp_path, **kw) as bot:
        api.send(CHAT, ADA, "hello?")
        async with asyncio.timeout(10):
            while not api.calls_of("sendMessage"):
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # refused, and waiting to send again
        assert len(api.calls_of("sendMessage")) == 1
        assert await bot.count(OutboxDelivery, OutboxDelivery.inflight_chunk.is_not(None)) == 0
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1)
    assert [m["text"] for m in api.bot_messages(CHAT.id)] == ["echo -> hello?"]
    (row,) = await bot.rows(OutboxDelivery)
    assert row.inflight_chunk is None


async def test_a_send_cut_off_by_a_crash_is_not_resent_after_the_restart(
    store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    """A process killed between a send and its answer leaves the row leased with its chunk in flight;
    the next process marks it `unknown` instead of posting it a second time."""
    api.fail("sendMessage", 500, times=10**6)
    async with running_bot(store, api, tmp_path, network_retries=0) as bot:
        api.send(CHAT, ADA, "are you there?")
        await bot.wait_until(lambda: bot.count(OutboxDelivery), 1)
    api.clear_failures()
    async with store.transaction() as session:  # what SIGKILL mid-send leaves behind
        await session.execute(
            update(OutboxDelivery).values(
                status="sending",
                lease_owner="killed:1:telegram",
                lease_expires_at=utcnow() - timedelta(seconds=1),
                inflight_chunk=0,
            )
        )
    sends = len(api.calls_of("sendMessage"))
    async with running_bot(store, api, tmp_path) as bot:
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "unknown"), 1)
    assert len(api.calls_of("sendMessage")) == sends and api.bot_messages(CHAT.id) == []
    (row,) = await bot.rows(OutboxDelivery)
    assert row.error == "chunk 1 was being sent when its process stopped; it may have been posted"
