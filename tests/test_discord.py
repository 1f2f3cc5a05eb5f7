"""The Discord adapter end to end: the real discord.py client against a fake Discord on 127.0.0.1,
through BotApp (dispatcher, store, worker, outbox) with a scripted backend.

The main conversation test runs on SQLite and PostgreSQL (`store`); the others use SQLite only
(`sqlite_store`) to keep the suite fast.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.config import load_settings
from bot.store import Store
from bot.store.models import Channel, Message
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


async def test_guild_mentions_dms_replies_and_threads(store: Store, fake: FakeDiscord) -> None:
    w = build_world(fake)
    thread = fake.add_thread(w.general, "Planning")
    forum = fake.add_channel(w.guild, "ideas", type=15)
    post = fake.add_thread(forum, "A forum post")
    dm = fake.open_dm(w.alice)
    bot = await start_bot(store, fake)
    try:
        # A mention in a guild channel: other mentions become display names, the bot's is stripped.
        first = await fake.say(
            w.general, w.alice, f"{mention(fake.bot)} hello {mention(w.bob)}!", mentions=[fake.bot, w.bob]
        )
        (reply,) = await bot.replies(w.general, 1)
        assert reply["content"] == "echo -> hello @Bobby!"
        assert reply["message_reference"]["message_id"] == first["id"]
        assert "<@" not in bot.backend.prompts[-1]

        # Without a mention nothing answers, but the message is stored for context.
        await fake.say(w.general, w.bob, "just chatting")
        # A reply to the bot's message answers, and the earlier line is in the prompt.
        await fake.say(w.general, w.bob, "tell me more", reply_to=reply)
        replies = await bot.replies(w.general, 2)
        assert replies[1]["content"] == "echo -> tell me more"
        assert "[Bobby] just chatting" in bot.backend.prompts[-1]

        # A DM needs no mention and gets no reply reference.
        await fake.say(dm, w.alice, "hi in private")
        (dm_reply,) = await bot.replies(dm, 1)
        assert dm_reply["content"] == "echo -> hi in private"
        assert "message_reference" not in dm_reply

        # Threads and forum posts are conversations of their own; replies go into them.
        await fake.say(thread, w.alice, f"{mention(fake.bot)} thread question", mentions=[fake.bot])
        await fake.say(post, w.bob, f"{mention(fake.bot)} forum question", mentions=[fake.bot])
        (thread_reply,) = await bot.replies(thread, 1)
        (post_reply,) = await bot.replies(post, 1)
        assert thread_reply["content"] == "echo -> thread question"
        assert post_reply["content"] == "echo -> forum question"
        assert "hello" not in bot.backend.prompts[-1] and "hello" not in bot.backend.prompts[-2]

        channels = {(c.external_id, c.thread_id): c for c in await bot.rows(Channel)}
        assert channels[(w.general["id"], thread["id"])].title == "Planning"
        assert channels[(forum["id"], post["id"])].kind == "group"
        assert channels[(dm["id"], "")].kind == "direct"

        # The outbox recorded Discord's ids, and the bot's own echoed messages were not stored again.
        delivered = await bot.delivered(5)
        assert sorted(i for d in delivered for i in d.delivered_ids) == sorted(m["id"] for m in fake.posted())
        assistant = await bot.rows(Message, Message.role == "assistant")
        assert sorted(m.platform_message_id for m in assistant) == sorted(m["id"] for m in fake.posted())
        users = await bot.rows(Message, Message.role == "user")
        assert len(users) == 6
        # Typing was shown while generating.
        assert w.general["id"] in fake.typing and dm["id"] in fake.typing
    finally:
        await bot.stop()


async def test_long_reply_is_split_under_the_limit(sqlite_store: Store, fake: FakeDiscord) -> None:
    w = build_world(fake)
    code = "\n".join(f"    value_{i} = compute({i})" for i in range(60))
    long_reply = (
        "Here is the plan. " * 60 + "\n\n" + f"```python\n{code}\n```" + "\n\n" + "And that is all. " * 40
    ).strip()
    bot = await start_bot(sqlite_store, fake, backend=scripted(lambda _: long_reply))
    try:
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} plan please", mentions=[fake.bot])
        await bot.delivered(1)
        posted = fake.posted(w.general)
        assert len(posted) >= 3
        assert all(0 < len(m["content"]) <= 2000 for m in posted)
        assert "message_reference" in posted[0] and all("message_reference" not in m for m in posted[1:])
        for message in posted:  # every message renders on its own: fences balanced
            assert message["content"].count("```") % 2 == 0
        rejoined = [line for m in posted for line in m["content"].split("\n") if "value_" in line]
        assert rejoined == code.split("\n")
        (row,) = await bot.delivered(1)
        assert row.delivered_ids == [m["id"] for m in posted]
    finally:
        await bot.stop()


async def test_streaming_edits_one_message_at_most_once_a_second(
    sqlite_store: Store, fake: FakeDiscord
) -> None:
    w = build_world(fake)
    final = " ".join(f"w{i}" for i in range(20))
    backend = scripted(lambda _: final, delay=0.11)
    settings = load_settings(worker={"poll_seconds": 0.05}, discord={"streaming": True})
    bot = await start_bot(sqlite_store, fake, settings=settings, backend=backend)
    stamps: list[float] = []
    original = bot.adapter.edit

    async def timed_edit(*args: Any) -> None:
        stamps.append(asyncio.get_running_loop().time())
        await original(*args)

    bot.adapter.edit = timed_edit  # type: ignore[method-assign]
    try:
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} count", mentions=[fake.bot])
        (row,) = await bot.delivered(1)
        (message,) = fake.posted(w.general)  # one message, edited: never a second post
        assert message["content"] == final and row.delivered_ids == [message["id"]]
        # Discord echoes every edit of the bot's message; none of them touches the stored reply.
        (stored,) = await bot.rows(Message, Message.role == "assistant")
        assert stored.text == final and stored.platform_message_id == message["id"]
        posts = fake.calls("POST", rf"/channels/{w.general['id']}/messages")
        assert len(posts) == 1 and posts[0][2]["content"].endswith(" …")
        edits = [
            body["content"]
            for _, _, body in fake.calls("PATCH", rf"/channels/{w.general['id']}/messages/\d+")
        ]
        # In-progress edits carry the marker; the final edit is the reply without it.
        assert len(edits) >= 2 and edits[-1] == final and all(e.endswith(" …") for e in edits[:-1])
        gaps = [b - a for a, b in itertools.pairwise(stamps)]
        assert stamps and all(gap >= 0.9 for gap in gaps)  # the throttle, whatever the machine's speed
    finally:
        await bot.stop()
