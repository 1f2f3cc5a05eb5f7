"""The Telegram adapter end to end: the real python-telegram-bot client, a fake Bot API on 127.0.0.1,
and the whole bot (dispatcher, store, worker, outbox) between them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.export import export_persona, scrub_exports
from bot.store import Store
from bot.store.models import Channel, Erasure, Message, OutboxDelivery, ReplyJob
from tests.fakes.backend import ScriptedBackend
from tests.fakes.telegram_harness import running_bot
from tests.fakes.telegram_server import BOT_USER, BOT_USERNAME, FakeBotAPI, FakeChat, FakeUser, utf16_len

ADA = FakeUser(42, "Ada", "ada")
BOB = FakeUser(43, "Bob")
ADMIN = FakeUser(7, "Root", "root")
GROUP = FakeChat(-1001, "supergroup", "Test Group")
MENTION = "@" + BOT_USERNAME


def mention_entity(offset: int = 0) -> dict[str, object]:
    return {"type": "mention", "offset": offset, "length": len(MENTION)}


@pytest.fixture
async def api() -> AsyncIterator[FakeBotAPI]:
    server = FakeBotAPI()
    await server.start()
    yield server
    await server.stop()


async def test_private_and_group_chats_are_answered_per_the_trigger_rules(
    store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    async with running_bot(store, api, tmp_path, access={"admins": [f"telegram:{ADMIN.id}"]}) as bot:
        # A private chat is always answered, without quoting.
        sent = api.send(FakeChat.private(ADA), ADA, "hello there")
        (reply,) = await bot.reply_in(ADA.id)
        assert reply["text"] == "echo -> hello there"
        assert "reply_to_message" not in reply

        # In a group, plain chatter is stored but not answered.
        api.send(GROUP, BOB, "just chatting among ourselves")
        await bot.settle()
        assert api.bot_messages(GROUP.id) == []
        assert [m.text for m in await bot.user_messages(GROUP.id)] == ["just chatting among ourselves"]

        # A mention is answered, quoting the message; the bot's own @name is not part of the text.
        asked = api.send(GROUP, BOB, f"{MENTION} what's up?", entities=[mention_entity()])
        replies = await bot.reply_in(GROUP.id, 1)
        assert replies[0]["text"] == "echo -> what's up?"
        assert replies[0]["reply_to_message"]["message_id"] == asked["message_id"]

        # A reply to the bot's message is answered.
        api.send(GROUP, BOB, "tell me more", reply_to=replies[0])
        replies = await bot.reply_in(GROUP.id, 2)
        assert replies[1]["text"] == "echo -> tell me more"

        # A trigger keyword, and the persona's name.
        api.send(GROUP, BOB, "who wants a cracker?")
        api.send(GROUP, BOB, "Polly, say hi")
        replies = await bot.reply_in(GROUP.id, 4)
        answered = {r["text"].removeprefix("echo -> ").rsplit("\n", 1)[-1] for r in replies[2:]}  # any order
        assert answered == {"who wants a cracker?", "Polly, say hi"}

        # Only an admin binds the group; then every message is answered.
        api.send(GROUP, BOB, "/persona parrot")
        replies = await bot.reply_in(GROUP.id, 5)
        assert "Only admins" in replies[4]["text"]
        api.send(GROUP, ADMIN, f"/persona@{BOT_USERNAME} parrot")
        replies = await bot.reply_in(GROUP.id, 6)
        assert "now answers in this channel" in replies[5]["text"]
        api.send(GROUP, BOB, "no trigger at all now")
        replies = await bot.reply_in(GROUP.id, 7)
        assert replies[6]["text"] == "echo -> no trigger at all now"

    # The store holds every turn, and the platform ids of the replies.
    assert sent["message_id"] is not None
    async with store.transaction() as session:
        from sqlalchemy import select

        rows = (await session.execute(select(OutboxDelivery))).scalars().all()
        assert rows and all(r.status == "delivered" and r.delivered_ids for r in rows)
        assistant = (
            (await session.execute(select(Message).where(Message.role == "assistant"))).scalars().all()
        )
        assert all(m.platform_message_id for m in assistant)
        assert len(assistant) == 6  # 1 private + 5 group replies (the two command answers are not stored)


async def test_forum_topics_are_separate_conversations(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    forum = FakeChat(-1002, "supergroup", "Forum", is_forum=True)
    async with running_bot(sqlite_store, api, tmp_path) as bot:
        api.send(forum, ADA, f"{MENTION} first topic", entities=[mention_entity()], thread_id=11)
        api.send(forum, BOB, f"{MENTION} second topic", entities=[mention_entity()], thread_id=22)
        replies = await bot.reply_in(forum.id, 2)
        by_thread = {r["message_thread_id"]: r["text"] for r in replies}
        assert by_thread == {11: "echo -> first topic", 22: "echo -> second topic"}
        channels = await bot.rows(Channel, Channel.external_id == str(forum.id))
        assert sorted(c.thread_id for c in channels) == ["11", "22"]

        # A topic message "replies" to the topic's creation message: that is no reply to the bot.
        created = api.message(forum, BOT_USER, None, thread_id=11)
        created["forum_topic_created"] = {"name": "t", "icon_color": 0}
        api.send(forum, ADA, "not for the bot", thread_id=11, reply_to=created)
        await bot.settle()
        assert len([m for m in api.bot_messages(forum.id) if "text" in m]) == 2


async def test_edited_messages_update_the_store(sqlite_store: Store, api: FakeBotAPI, tmp_path: Path) -> None:
    async with running_bot(sqlite_store, api, tmp_path) as bot:
        original = api.send(FakeChat.private(ADA), ADA, "my first draft")
        await bot.reply_in(ADA.id)
        api.edit(original, "my second thought")
        await bot.settle()
        (stored,) = await bot.user_messages(ADA.id)
        assert stored.text == "my second thought"
        assert stored.edited_at is not None
        # An edit is not a new message: nothing more is answered.
        assert len(api.bot_messages(ADA.id)) == 1


async def test_duplicate_updates_are_stored_and_answered_once(
    store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    async with running_bot(store, api, tmp_path) as bot:
        msg = api.message(FakeChat.private(ADA), ADA, "only once, please")
        update_id = api.push({"message": msg})
        api.push({"update_id": update_id, "message": msg})  # the same update again
        api.push({"message": msg})  # the same message in a new update (e.g. a webhook retry)
        await bot.reply_in(ADA.id)
        await bot.settle()
        assert len(await bot.user_messages(ADA.id)) == 1
        assert await bot.count(ReplyJob) == 1
        assert [m["text"] for m in api.bot_messages(ADA.id)] == ["echo -> only once, please"]


async def test_blocked_users_get_nothing_and_leave_nothing(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    eve = FakeUser(666, "Eve")
    async with running_bot(
        sqlite_store, api, tmp_path, access={"blocked_users": [f"telegram:{eve.id}"]}
    ) as bot:
        api.send(FakeChat.private(eve), eve, "let me in")
        api.send(GROUP, eve, f"{MENTION} hey", entities=[mention_entity()])
        api.send(FakeChat.private(eve), eve, "/start")
        await bot.settle()
        assert api.bot_messages(eve.id) == [] and api.bot_messages(GROUP.id) == []
        assert await bot.user_messages(eve.id) == [] and await bot.user_messages(GROUP.id) == []


async def test_start_greets_and_commands_for_other_bots_are_ignored(
    sqlite_store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    async with running_bot(sqlite_store, api, tmp_path) as bot:
        api.send(
            FakeChat.private(ADA), ADA, "/start", entities=[{"type": "bot_command", "offset": 0, "length": 6}]
        )
        (greeting,) = await bot.reply_in(ADA.id)
        assert greeting["text"] == "Squawk! Polly here. Say something and I'll say it back."

        other = "/start@SomeOtherBot"
        api.send(GROUP, BOB, other, entities=[{"type": "bot_command", "offset": 0, "length": len(other)}])
        ours = f"/start@{BOT_USERNAME}"
        asked = api.send(
            GROUP, BOB, ours, entities=[{"type": "bot_command", "offset": 0, "length": len(ours)}]
        )
        (answer,) = await bot.reply_in(GROUP.id)
        assert answer["text"].startswith("Squawk!")
        assert answer["reply_to_message"]["message_id"] == asked["message_id"]
        await bot.settle()
        assert len(api.bot_messages(GROUP.id)) == 1
        assert await bot.user_messages(GROUP.id) == []  # commands are not conversation


async def test_forget_erases_the_user_in_this_chat_after_confirmation(
    store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    exports = tmp_path / "exports"
    async with running_bot(store, api, tmp_path) as bot:
        api.send(GROUP, ADA, "/optin")  # so her words reach a training export first
        await bot.reply_in(GROUP.id, 1)
        api.send(GROUP, ADA, f"{MENTION} remember my secret: 1234", entities=[mention_entity()])
        await bot.reply_in(GROUP.id, 2)
        api.send(GROUP, BOB, f"{MENTION} and mine is 5678", entities=[mention_entity()])
        await bot.reply_in(GROUP.id, 3)
        api.send(FakeChat.private(ADA), ADA, "a private note")
        await bot.reply_in(ADA.id, 1)
        await bot.wait_until(lambda: bot.count(OutboxDelivery, OutboxDelivery.status == "delivered"), 3)
        exported = await export_persona(store, "parrot", exports / "parrot.jsonl", sources=True)
        assert exported.conversations == 2 and "1234" in (exports / "parrot.jsonl").read_text()

        api.send(GROUP, ADA, "/forget")
        replies = await bot.reply_in(GROUP.id, 4)
        assert "/forget confirm" in replies[3]["text"]
        assert len(await bot.user_messages(GROUP.id)) == 2  # asking changes nothing

        api.send(GROUP, ADA, "/forget confirm")
        replies = await bot.reply_in(GROUP.id, 5)
        assert replies[4]["text"] == "Done: I erased 1 of your messages and 1 of my replies here."

        # Ada's words and the reply to them are gone from messages, jobs and the outbox; Bob's stay.
        texts = [m.text for m in await bot.rows(Message)]
        assert not any("1234" in t for t in texts)
        assert any("5678" in t for t in texts)
        assert "a private note" in texts  # another chat is not touched
        assert await bot.count(ReplyJob) == 2  # Bob's and the private one
        assert await bot.count(OutboxDelivery) == 2
        (erasure,) = await bot.rows(Erasure)
        assert (erasure.platform, erasure.user_external_id) == ("telegram", str(ADA.id))

        # The export written before is scrubbed of the group conversation; her private one stays.
        assert await scrub_exports(store, exports) == 1
        assert "1234" not in (exports / "parrot.jsonl").read_text()
        assert "a private note" in (exports / "parrot.jsonl").read_text()

        # The next prompt in the group no longer contains Ada's message.
        api.send(GROUP, BOB, f"{MENTION} what did she say?", entities=[mention_entity()])
        await bot.reply_in(GROUP.id, 6)
        assert "1234" not in bot.backend.prompts[-1]


async def test_input_telegram_can_send_is_handled_without_a_crash(
    store: Store, api: FakeBotAPI, tmp_path: Path
) -> None:
    chat = FakeChat.private(ADA)
    photo = [{"file_id": "p1", "file_unique_id": "u1", "width": 90, "height": 90}]
    sticker = {
        "file_id": "s1",
        "file_unique_id": "su1",
        "type": "regular",
        "width": 512,
        "height": 512,
        "is_animated": False,
        "is_video": False,
        "emoji": "😀",
    }
    backend = ScriptedBackend(context_window=100_000)
    async with running_bot(store, api, tmp_path, backend=backend) as bot:
        api.send(chat, ADA, photo=photo)  # no text at all
        api.send(chat, ADA, sticker=sticker)
        api.send(
            GROUP, BOB, photo=photo, caption=f"{MENTION} look at this", caption_entities=[mention_entity()]
        )
        # Entities pointing past the end of the text, or into the middle of a surrogate pair.
        api.send(
            chat, ADA, "hi 😀", entities=[{"type": "mention", "offset": 4, "length": 50}, mention_entity(40)]
        )
        api.send(chat, ADA, "broken \ud800 surrogate and a \x00 NUL")  # sent as a JSON \\ud800 escape
        long_text = "word " * 1200 + "end."  # 6,004 characters
        api.send(chat, ADA, long_text)

        await bot.reply_in(GROUP.id, 1)
        await bot.settle()
        assert api.bot_messages(GROUP.id)[0]["text"] == "echo -> look at this"
        texts = [m.text for m in await bot.user_messages(ADA.id)]
        # The photo and the sticker carry no text: nothing to store, nothing to answer.
        assert texts == ["hi 😀", "broken \ufffd surrogate and a  NUL", long_text]
        # Three replies; the one echoing the long text came back split under the limit.
        await api.wait_for(lambda: len(api.bot_messages(ADA.id)) >= 4)
        delivered = OutboxDelivery.status == "delivered"
        await bot.wait_until(lambda: bot.count(OutboxDelivery, delivered), 4)
        posted = [m["text"] for m in api.bot_messages(ADA.id)]
        assert all(utf16_len(t) <= 4096 for t in posted)
        (long_reply,) = [
            m for m in await bot.rows(Message, Message.role == "assistant") if m.text.endswith("end.")
        ]
        (row,) = await bot.rows(OutboxDelivery, OutboxDelivery.message_id == long_reply.id)
        assert len(row.delivered_ids) >= 2  # over 6,000 characters: split
        assert sum(1 for p in posted if p.endswith("word end.")) == 1
