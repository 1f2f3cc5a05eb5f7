"""`/forget`: what the store holds of a user in a chat is erased, on every platform, and recorded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import func, select

from adapters.discord import DiscordAdapter
from adapters.telegram import TelegramAdapter
from bot.config import load_settings
from bot.dispatch import Dispatcher
from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming
from bot.store import Store, conversations, jobs
from bot.store.models import Erasure, Message, OutboxDelivery, ReplyJob, User
from bot.store.privacy import erasures_for, forget_user
from personas.registry import PersonaRegistry

ADA = AuthorRef("telegram", "42", "Ada")
BOB = AuthorRef("telegram", "43", "Bob")
TOPIC_A = ChannelRef("telegram", "-100", ChannelKind.GROUP, thread_id="11")
TOPIC_B = ChannelRef("telegram", "-100", ChannelKind.GROUP, thread_id="22")
DM = ChannelRef("telegram", "42", ChannelKind.DIRECT)


async def say(store: Store, channel: ChannelRef, author: AuthorRef, text: str, *, answer: bool = True) -> int:
    """Store a message with a reply job; with `answer`, the reply is written (and waits in the outbox)."""
    async with store.transaction() as s:
        stored = await conversations.ingest(
            s,
            Incoming("telegram", channel, author, text, platform_message_id=f"{channel.key}:{text}"[:120]),
        )
        await jobs.enqueue(
            s,
            channel_id=stored.channel_id,
            persona="assistant",
            dedupe_key=f"msg:{stored.message_id}:assistant",
            trigger_message_id=stored.message_id,
        )
    if answer:
        async with store.transaction() as s:
            (job,) = await jobs.claim(s, owner="t", limit=1, lease_seconds=60, max_attempts=3)
            await jobs.complete(s, job, text=f"re: {text}", persona="assistant", platform="telegram")
    return stored.message_id


async def count(store: Store, model: type, *where: object) -> int:
    async with store.transaction() as s:
        return (await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one()


async def texts(store: Store) -> list[str]:
    async with store.transaction() as s:
        return list((await s.execute(select(Message.text).order_by(Message.id))).scalars())


async def test_forget_erases_messages_jobs_replies_and_outbox_in_every_topic_of_the_chat(
    store: Store,
) -> None:
    await say(store, TOPIC_A, ADA, "ada in topic a")
    await say(store, TOPIC_A, BOB, "bob in topic a")
    await say(store, TOPIC_B, ADA, "ada in topic b")
    await say(store, DM, ADA, "ada in private")
    await say(store, TOPIC_B, ADA, "ada, not answered yet", answer=False)  # a pending job

    async with store.transaction() as s:
        done = await forget_user(s, ADA, TOPIC_A)
    assert (done.messages, done.replies, done.jobs) == (3, 2, 3)
    assert await texts(store) == [
        "bob in topic a",
        "re: bob in topic a",
        "ada in private",
        "re: ada in private",
    ]
    assert await count(store, ReplyJob) == 2  # Bob's and the private one
    assert await count(store, OutboxDelivery) == 2
    assert await count(store, User, User.external_id == "42") == 1  # still in the private chat

    async with store.transaction() as s:
        recorded = await erasures_for(s, "telegram", "42")
    assert len(recorded) == 2 and len({e.channel_id for e in recorded}) == 2  # one per topic
    assert set(done.erasure_ids) == {e.id for e in recorded}

    # Forgotten in the last chat that held them: the user's row goes too.
    async with store.transaction() as s:
        done = await forget_user(s, ADA, DM)
    assert (done.messages, done.replies, done.jobs) == (1, 1, 1)
    assert await count(store, User, User.external_id == "42") == 0
    assert await count(store, Erasure) == 3


async def test_forgetting_someone_the_store_never_saw_still_records_the_request(store: Store) -> None:
    async with store.transaction() as s:
        done = await forget_user(s, AuthorRef("discord", "77", "Zed"), ChannelRef("discord", "9"))
    assert (done.messages, done.replies, done.jobs) == (0, 0, 0)
    async with store.transaction() as s:
        (erasure,) = await erasures_for(s, "discord", "77")
    assert erasure.channel_id is None


async def test_forget_command_asks_first_and_works_on_every_platform(store: Store) -> None:
    settings = load_settings()
    # Each platform's command conventions, as its adapter declares them (Discord adds "!" commands).
    conventions = {"discord": DiscordAdapter(None).conventions, "telegram": TelegramAdapter.conventions}
    dispatcher = Dispatcher(settings, store, PersonaRegistry.discover(), conventions=conventions)
    for platform, prefix in (("console", "/"), ("discord", "!"), ("telegram", "/")):
        channel = ChannelRef(platform, "c1", ChannelKind.DIRECT)
        user = AuthorRef(platform, "u1", "User")
        ids = iter(range(1, 100))

        async def send(
            text: str, channel: ChannelRef = channel, user: AuthorRef = user, ids: Iterator[int] = ids
        ) -> str | None:
            event = Incoming(channel.platform, channel, user, text, f"m{next(ids)}")
            return (await dispatcher.handle(event)).notice

        await send("something personal")
        asked = await send(f"{prefix}forget")
        assert asked is not None and "/forget confirm" in asked
        assert await count(store, Message, Message.text == "something personal") == 1
        done = await send(f"{prefix}forget confirm")
        assert done == "Done: I erased 1 of your messages and 0 of my replies here."
        assert await count(store, Message, Message.text == "something personal") == 0
        assert await count(store, ReplyJob) == 0
        async with store.transaction() as s:
            assert len(await erasures_for(s, platform, "u1")) == 1


async def test_start_answers_with_the_greeting_of_the_channels_persona(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    await store.upgrade()
    try:
        registry = PersonaRegistry.discover()
        dispatcher = Dispatcher(load_settings(), store, registry)
        channel = ChannelRef("console", "c1", ChannelKind.DIRECT)
        event = Incoming("console", channel, AuthorRef("console", "u", "U"), "/start", "m1")
        result = await dispatcher.handle(event)
    finally:
        await store.close()
    spec = registry.get("assistant").spec
    assert result.notice == (spec.greeting or f"Hi, I'm {spec.name}. Send /help to see what I can do.")
