"""Discord and the rules in bot/: edits and deletes, access control, admin commands (slash and
prefix), and cooldown notices, each through the real client, dispatcher and store."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.config import load_settings
from bot.store import Store
from bot.store.models import Message
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


async def test_edited_and_deleted_messages_change_what_later_prompts_see(
    store: Store, fake: FakeDiscord
) -> None:
    w = build_world(fake)
    bot = await start_bot(store, fake, backend=scripted(lambda _: "noted"))
    try:
        secret = await fake.say(
            w.general, w.alice, f"{mention(fake.bot)} my password is hunter2", mentions=[fake.bot]
        )
        await bot.replies(w.general, 1)
        drink = await fake.say(w.general, w.alice, "I like tea")
        spam = [await fake.say(w.general, w.bob, f"spam {n}") for n in range(3)]
        await fake.edit(drink, "I like coffee")
        await fake.delete(secret)
        await fake.delete_bulk(spam)
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} what do you know?", mentions=[fake.bot])
        await bot.replies(w.general, 2)
        prompt = bot.backend.prompts[-1]
        assert "I like coffee" in prompt and "what do you know?" in prompt
        assert "hunter2" not in prompt and "tea" not in prompt and "spam" not in prompt
        rows = {m.platform_message_id: m for m in await bot.rows(Message, Message.role == "user")}
        assert rows[secret["id"]].text == "" and rows[secret["id"]].deleted_at is not None
        assert rows[drink["id"]].text == "I like coffee" and rows[drink["id"]].edited_at is not None
    finally:
        await bot.stop()


async def test_blocked_users_and_roles_are_ignored(sqlite_store: Store, fake: FakeDiscord) -> None:
    w = build_world(fake)
    muted = fake.add_role(w.guild, "Muted")
    carol = fake.add_user("carol", global_name="Carol")
    fake.add_member(w.guild, carol, roles=[muted])
    settings = load_settings(
        worker={"poll_seconds": 0.05},
        access={
            "blocked_users": [f"discord:{w.bob['id']}"],
            "blocked_roles": [f"discord:role:{muted['id']}"],
        },
    )
    bot = await start_bot(sqlite_store, fake, settings=settings)
    try:
        await fake.say(w.general, w.bob, f"{mention(fake.bot)} I am blocked", mentions=[fake.bot])
        await fake.say(w.general, carol, f"{mention(fake.bot)} I am muted", mentions=[fake.bot])
        await fake.say(w.general, w.bob, "!persona pirate")  # commands are refused too
        await fake.say(w.general, w.alice, f"{mention(fake.bot)} I am welcome", mentions=[fake.bot])
        (reply,) = await bot.replies(w.general, 1)
        assert reply["content"] == "echo -> I am welcome"
        assert [m.text for m in await bot.rows(Message, Message.role == "user")] == ["I am welcome"]
        response = await fake.slash(w.general, w.bob, "personas")
        assert response["data"]["flags"] & 64  # ephemeral: only bob sees the refusal
    finally:
        await bot.stop()


async def test_persona_command_for_admins_and_others(sqlite_store: Store, fake: FakeDiscord) -> None:
    w = build_world(fake)
    moderators = fake.add_role(w.guild, "Moderators")
    admin = fake.add_user("ada", global_name="Ada")
    fake.add_member(w.guild, admin, roles=[moderators])
    dm = fake.open_dm(w.bob)
    settings = load_settings(
        worker={"poll_seconds": 0.05}, access={"admins": [f"discord:role:{moderators['id']}"]}
    )
    bot = await start_bot(sqlite_store, fake, settings=settings)
    try:
        # Slash commands: the dispatcher's answer is the interaction response.
        refused = await fake.slash(w.general, w.bob, "persona", name="pirate")
        assert refused["type"] == 4 and "Only admins" in refused["data"]["content"]
        accepted = await fake.slash(w.general, admin, "persona", name="pirate")
        assert "Pirate (pirate) now answers" in accepted["data"]["content"]
        # In a DM anyone may choose.
        in_dm = await fake.slash(dm, w.bob, "persona", name="pirate")
        assert "now answers" in in_dm["data"]["content"]
        # Every registered slash command reaches the dispatcher.
        assert {c["name"] for c in fake.commands} == {
            "persona",
            "personas",
            "reset",
            "help",
            "forget",
            "optin",
            "optout",
        }
        assert "Thank you" in (await fake.slash(dm, w.bob, "optin"))["data"]["content"]

        # Prefix commands: the answer is posted as a reply to the command.
        command = await fake.say(w.general, w.bob, "!persona assistant")
        await fake.say(w.general, w.bob, "!personas")
        notices = await bot.replies(w.general, 2)
        assert "Only admins" in notices[0]["content"]
        assert notices[0]["message_reference"]["message_id"] == command["id"]
        assert "pirate: Pirate" in notices[1]["content"]

        # The channel is bound to the pirate now: it answers every message there.
        await fake.say(w.general, w.bob, "ahoy")
        await bot.delivered(1)
        (answer,) = await bot.rows(Message, Message.role == "assistant")
        assert answer.persona == "pirate" and "Talk like a pirate." in bot.backend.prompts[-1]
        # Commands are never conversation turns.
        assert [m.text for m in await bot.rows(Message, Message.role == "user")] == ["ahoy"]
    finally:
        await bot.stop()


async def test_a_slow_command_is_deferred_and_answered_in_a_follow_up(
    sqlite_store: Store, fake: FakeDiscord
) -> None:
    w = build_world(fake)
    bot = await start_bot(sqlite_store, fake)
    bot.adapter.interaction_defer_after = 0.0  # as if the store took longer than Discord waits
    try:
        response = await fake.slash(w.general, w.alice, "personas")
        assert response.get("followup") and "pirate: Pirate" in response["data"]["content"]
        (deferred,) = fake.interaction_responses.values()
        assert deferred["type"] == 5
    finally:
        await bot.stop()


async def test_cooldown_sends_one_notice_per_window(sqlite_store: Store, fake: FakeDiscord) -> None:
    w = build_world(fake)
    settings = load_settings(worker={"poll_seconds": 0.05}, access={"user_cooldown_per_minute": 1})
    bot = await start_bot(sqlite_store, fake, settings=settings)
    try:
        for n in range(4):
            await fake.say(w.general, w.alice, f"{mention(fake.bot)} message {n}", mentions=[fake.bot])
        await fake.say(w.general, w.bob, f"{mention(fake.bot)} someone else", mentions=[fake.bot])
        await bot.delivered(2)
        contents = [m["content"] for m in fake.posted(w.general)]
        replies = sorted(c for c in contents if c.startswith("echo"))
        assert replies == ["echo -> message 0", "echo -> someone else"]
        assert sum("Slow down" in c for c in contents) == 1  # one notice, not one per message
        assert len(contents) == 3
    finally:
        await bot.stop()


async def test_slash_commands_are_registered_once_not_on_every_start(
    sqlite_store: Store, fake: FakeDiscord
) -> None:
    """Registration is rate limited: a second start finds Discord's list unchanged and sends no PUT."""
    commands = rf"/applications/{fake.application_id}/commands"
    for _ in range(2):
        bot = await start_bot(sqlite_store, fake)
        await bot.stop()
    assert len(fake.calls("GET", commands)) == 2
    assert len(fake.calls("PUT", commands)) == 1
    options = {c["name"]: [o["name"] for o in c.get("options", [])] for c in fake.commands}
    assert options["persona"] == ["name"] and options["forget"] == ["confirm"]
