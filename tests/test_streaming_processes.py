"""Typing and streamed edits when the worker runs in another process (here: its own store connection
and a worker without the bot's relays, as `personabot worker` runs), and a streamed message that
survives a restart of the bot process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import update

from bot.config import load_settings
from bot.store import Store
from bot.store.models import OutboxDelivery, ReplyJob, ReplyStream
from bot.stream_follow import StreamPublisher
from bot.worker import Worker
from personas.registry import PersonaRegistry
from tests.fakes.backend import ScriptedBackend
from tests.fakes.telegram_harness import running_bot, write_personas
from tests.fakes.telegram_server import FakeBotAPI, FakeChat, FakeUser

ADA = FakeUser(42, "Ada", "ada")
CHAT = FakeChat.private(ADA)


@pytest.fixture
async def api() -> AsyncIterator[FakeBotAPI]:
    server = FakeBotAPI()
    await server.start()
    yield server
    await server.stop()


async def test_a_worker_elsewhere_drives_typing_and_streamed_edits(
    store: Store, db_url: str, api: FakeBotAPI, tmp_path: Path
) -> None:
    words = [f"word{i}" for i in range(40)]
    text = " ".join(words)
    elsewhere = Store(db_url)  # the worker's own connection to the database
    settings = load_settings(personas_dir=str(write_personas(tmp_path)), worker={"poll_seconds": 0.05})
    registry = PersonaRegistry.discover(settings.personas_dir)
    backend = ScriptedBackend(lambda prompt: text, delay=0.05)
    worker = Worker(settings, elsewhere, registry, backend, observers=[StreamPublisher(elsewhere)])
    stop = asyncio.Event()
    working = asyncio.create_task(worker.run(stop))
    try:
        async with running_bot(
            store, api, tmp_path, worker=False, streaming=True, stream_min_interval=0.1, stream_min_growth=10
        ) as bot:
            for follower in bot.app.followers:
                follower.poll_seconds = 0.2  # SQLite has no NOTIFY between connections: poll fast
            api.send(CHAT, ADA, "stream it from elsewhere")
            await bot.wait_until(
                lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1, 20
            )
            async with asyncio.timeout(10):  # the follower ended the stream and cleaned up
                while await bot.count(ReplyStream):
                    await asyncio.sleep(0.05)
        (job,) = await bot.rows(ReplyJob)
    finally:
        stop.set()
        await working
        await elsewhere.close()
    (message,) = api.bot_messages(CHAT.id)  # one message: the preview, edited into the reply
    assert message["text"] == text
    assert job.streamed_id == str(message["message_id"])
    sends = [c for c in api.calls_of("sendMessage") if c.int("chat_id") == CHAT.id]
    assert len(sends) == 1 and sends[0].params["text"].endswith(" …")
    edits = api.calls_of("editMessageText")
    assert len(edits) >= 2  # streamed edits, then the final text
    assert [c for c in api.calls_of("sendChatAction") if c.int("chat_id") == CHAT.id]  # typing


async def test_a_restart_edits_the_streamed_message_instead_of_posting_another(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    """The preview's id is stored with the job: a bot process that stops after streaming and before the
    final delivery leaves it to the next process, which edits the preview in place."""
    api.fail("editMessageText", 500, times=10**6)  # the final edit cannot happen in the first run
    text = " ".join(f"word{i}" for i in range(30))
    backend = ScriptedBackend(lambda prompt: text, delay=0.03)
    async with running_bot(
        sqlite_store,
        api,
        tmp_path,
        backend=backend,
        streaming=True,
        stream_min_interval=0.05,
        stream_min_growth=10,
        network_retries=0,
    ) as bot:
        api.send(CHAT, ADA, "stream, then crash")
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.attempts >= 1), 1)
    async with sqlite_store.transaction() as session:  # what the first process left
        await session.execute(update(OutboxDelivery).values(status="pending", attempts=0))
    (preview,) = api.bot_messages(CHAT.id)
    assert preview["text"].endswith(" …")
    api.clear_failures()
    async with running_bot(sqlite_store, api, tmp_path) as bot:  # no relay memory of the preview
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 1)
    (message,) = api.bot_messages(CHAT.id)
    assert message["message_id"] == preview["message_id"] and message["text"] == text
