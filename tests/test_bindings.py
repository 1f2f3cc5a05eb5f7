"""Channel bindings end to end through Dispatcher.handle on SQLite and PostgreSQL.

`/persona` binds, `/personas` lists, `/reset` starts fresh; admins only in group channels, anyone in a
DM; messages then become reply jobs for the persona the rules pick.
"""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import select

from bot.config import Settings
from bot.dispatch import Dispatcher
from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming
from bot.store import Store, conversations
from bot.store.models import Channel, ChannelPersona, ReplyJob
from personas.registry import PersonaRegistry

GROUP = ChannelRef("console", "general", ChannelKind.GROUP, title="general")
OTHER_GROUP = ChannelRef("console", "random", ChannelKind.GROUP)
DM = ChannelRef("console", "dm-bob", ChannelKind.DIRECT)
ADMIN = AuthorRef("console", "alice", "Alice")
USER = AuthorRef("console", "bob", "Bob")
_ids = itertools.count()


def say(text: str, channel: ChannelRef = GROUP, author: AuthorRef = USER, **kw: object) -> Incoming:
    return Incoming(
        platform=channel.platform,
        channel=channel,
        author=author,
        text=text,
        platform_message_id=f"m{next(_ids)}",
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def dispatcher(store: Store) -> Dispatcher:
    settings = Settings(
        default_persona="assistant",
        access={"admins": ["console:alice"], "user_cooldown_per_minute": 0, "channel_cooldown_per_minute": 0},
    )
    return Dispatcher(settings, store, PersonaRegistry.discover(entry_points=False))


async def job_personas(store: Store, job_ids: list[int]) -> list[str]:
    async with store.transaction() as s:
        rows = await s.execute(select(ReplyJob.persona).where(ReplyJob.id.in_(job_ids)).order_by(ReplyJob.id))
        return list(rows.scalars())


async def bound(store: Store, ref: ChannelRef) -> list[str]:
    async with store.transaction() as s:
        channel_id = await conversations.find_channel(s, ref)
        return await conversations.bound_personas(s, channel_id) if channel_id is not None else []


async def test_unbound_group_channel_uses_the_default_persona_when_addressed(
    dispatcher: Dispatcher, store: Store
) -> None:
    plain = await dispatcher.handle(say("just chatting among ourselves"))
    assert plain.stored and plain.job_ids == []
    mentioned = await dispatcher.handle(say("what time is it?", mentions_bot=True))
    assert await job_personas(store, mentioned.job_ids) == ["assistant"]


async def test_non_admin_cannot_bind_in_a_group_and_nothing_changes(
    dispatcher: Dispatcher, store: Store
) -> None:
    result = await dispatcher.handle(say("/persona pirate"))
    assert result.notice == "Only admins can change the persona in a group channel."
    assert not result.stored
    assert await bound(store, GROUP) == []
    reply = await dispatcher.handle(say("hello there", mentions_bot=True))
    assert await job_personas(store, reply.job_ids) == ["assistant"]


async def test_admin_binds_a_persona_which_then_answers_every_message(
    dispatcher: Dispatcher, store: Store
) -> None:
    result = await dispatcher.handle(say("/persona pirate", author=ADMIN))
    assert result.notice == "Captain Saltbeard (pirate) now answers in this channel."
    assert await bound(store, GROUP) == ["pirate"]
    async with store.transaction() as s:
        who = (await s.execute(select(ChannelPersona.bound_by))).scalar_one()
    assert who == "console:alice"
    # A bound channel: every message is answered by the bound persona, no mention needed.
    reply = await dispatcher.handle(say("where is the treasure?"))
    assert await job_personas(store, reply.job_ids) == ["pirate"]
    # The binding is per channel.
    elsewhere = await dispatcher.handle(say("where is the treasure?", channel=OTHER_GROUP))
    assert elsewhere.job_ids == []


async def test_anyone_binds_in_a_dm(dispatcher: Dispatcher, store: Store) -> None:
    result = await dispatcher.handle(say("/persona poet", channel=DM))
    assert result.notice == "Basho-bot (poet) now answers in this channel."
    reply = await dispatcher.handle(say("tell me about rain", channel=DM))
    assert await job_personas(store, reply.job_ids) == ["poet"]


async def test_unknown_persona_is_refused_and_lists_the_available_ones(
    dispatcher: Dispatcher, store: Store
) -> None:
    result = await dispatcher.handle(say("/persona kraken", channel=DM))
    assert result.notice == "Unknown persona 'kraken'. Available: assistant, pirate, poet."
    assert await bound(store, DM) == []


async def test_several_personas_share_a_channel_and_answer_when_named(
    dispatcher: Dispatcher, store: Store
) -> None:
    await dispatcher.handle(say("/persona pirate", author=ADMIN))
    added = await dispatcher.handle(say("/persona add poet", author=ADMIN))
    assert added.notice is not None and "poet joined this channel" in added.notice
    assert await bound(store, GROUP) == ["pirate", "poet"]

    unaddressed = await dispatcher.handle(say("what a day"))
    named = await dispatcher.handle(say("poet, describe the sea"))
    at_named = await dispatcher.handle(say("what do you think @poet?"))
    by_display_name = await dispatcher.handle(say("Captain Saltbeard: which way is north?"))
    keyword = await dispatcher.handle(say("write me a haiku about cats"))  # the poet's keyword
    assert await job_personas(store, unaddressed.job_ids) == ["pirate"]
    assert await job_personas(store, named.job_ids) == ["poet"]
    assert await job_personas(store, at_named.job_ids) == ["poet"]
    assert await job_personas(store, by_display_name.job_ids) == ["pirate"]
    assert await job_personas(store, keyword.job_ids) == ["poet"]

    listing = await dispatcher.handle(say("/personas"))
    lines = listing.notice.splitlines()
    assert lines[0] == "Available personas:"
    assert [line.split(":")[0] for line in lines[1:]] == ["assistant", "pirate", "poet"]
    assert [line.endswith("(answers here)") for line in lines[1:]] == [False, True, True]

    status = await dispatcher.handle(say("/persona"))
    assert status.notice.startswith("This channel talks to pirate; name the others to talk to them (poet)")

    removed = await dispatcher.handle(say("/persona remove pirate", author=ADMIN))
    assert removed.notice == "pirate no longer answers here; poet does."
    after = await dispatcher.handle(say("and now?"))
    assert await job_personas(store, after.job_ids) == ["poet"]


async def test_add_to_a_default_channel_keeps_the_default_answering(
    dispatcher: Dispatcher, store: Store
) -> None:
    await dispatcher.handle(say("/persona add poet", channel=DM))
    assert await bound(store, DM) == ["assistant", "poet"]
    reply = await dispatcher.handle(say("hi", channel=DM))
    assert await job_personas(store, reply.job_ids) == ["assistant"]


async def test_binding_replaces_and_default_unbinds(dispatcher: Dispatcher, store: Store) -> None:
    await dispatcher.handle(say("/persona pirate poet", author=ADMIN))
    assert await bound(store, GROUP) == ["pirate", "poet"]
    await dispatcher.handle(say("/persona poet", author=ADMIN))
    assert await bound(store, GROUP) == ["poet"]
    cleared = await dispatcher.handle(say("/persona default", author=ADMIN))
    assert cleared.notice == "Back to the default persona, assistant."
    assert await bound(store, GROUP) == []
    plain = await dispatcher.handle(say("anyone here?"))
    assert plain.job_ids == []  # an unbound group channel only answers when addressed


async def test_a_named_persona_answers_in_any_channel(dispatcher: Dispatcher, store: Store) -> None:
    reply = await dispatcher.handle(say("pirate, how do I tie a bowline?"))
    assert await job_personas(store, reply.job_ids) == ["pirate"]


async def test_reset_starts_a_fresh_context_and_keeps_history(dispatcher: Dispatcher, store: Store) -> None:
    await dispatcher.handle(say("/persona pirate", channel=DM))
    await dispatcher.handle(say("my name is Bob", channel=DM))
    result = await dispatcher.handle(say("/reset", channel=DM))
    assert result.notice is not None and result.notice.startswith("Context cleared")
    await dispatcher.handle(say("what is my name?", channel=DM))
    async with store.transaction() as s:
        channel_id = await conversations.find_channel(s, DM)
        visible = [m.text for m in await conversations.history(s, channel_id)]
        floor = (
            await s.execute(select(Channel.context_floor_id).where(Channel.id == channel_id))
        ).scalar_one()
    assert visible == ["what is my name?"]
    assert floor is not None
    # The binding survives a reset.
    assert await bound(store, DM) == ["pirate"]


async def test_a_bound_persona_that_disappeared_falls_back_to_the_default(
    dispatcher: Dispatcher, store: Store
) -> None:
    await dispatcher.handle(say("/persona pirate", channel=DM))
    # The pirate is uninstalled: a registry without it.
    dispatcher.registry = PersonaRegistry([p for p in dispatcher.registry.all() if p.slug != "pirate"])
    reply = await dispatcher.handle(say("ahoy?", channel=DM))
    assert await job_personas(store, reply.job_ids) == ["assistant"]


async def test_commands_typed_by_users_are_never_stored_as_turns(
    dispatcher: Dispatcher, store: Store
) -> None:
    await dispatcher.handle(say("/persona pirate", channel=DM))
    await dispatcher.handle(say("/personas", channel=DM))
    async with store.transaction() as s:
        channel_id = await conversations.find_channel(s, DM)
        assert await conversations.history(s, channel_id) == []
