"""Training exports: only opted-in users' conversations, nothing of users who opted out or used
/forget, in the trainer's JSONL format; earlier exports are scrubbed; `personabot dataset export`."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bot.cli import main
from bot.config import load_settings
from bot.dispatch import Dispatcher
from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming
from bot.export import collect_conversations, export_persona, scrub_exports
from bot.store import Store
from bot.worker import Worker
from personas.registry import PersonaRegistry
from tests.fakes.backend import ScriptedBackend, last_user_text

START = datetime.now(UTC) - timedelta(days=2)


class Chat:
    """Users talking to the pirate through the real dispatcher and worker."""

    def __init__(
        self, store: Store, persona: str = "pirate", registry: PersonaRegistry | None = None
    ) -> None:
        self.settings = load_settings(
            default_persona=persona, access={"user_cooldown_per_minute": 0, "channel_cooldown_per_minute": 0}
        )
        self.registry = registry or PersonaRegistry.discover()
        self.persona = persona
        self.store = store
        self.dispatcher = Dispatcher(self.settings, store, self.registry)
        self.worker = Worker(
            self.settings, store, self.registry, ScriptedBackend(lambda p: f"Arr, {last_user_text(p)}!")
        )
        self.count = 0

    async def say(self, user: str, text: str, *, minutes: float, chat: str | None = None) -> str | None:
        self.count += 1
        direct = chat is None
        ref = ChannelRef("console", chat or f"dm-{user}", ChannelKind.DIRECT if direct else ChannelKind.GROUP)
        result = await self.dispatcher.handle(
            Incoming(
                platform="console",
                channel=ref,
                author=AuthorRef("console", user, user.title()),
                text=text if direct or text.startswith("/") else f"{self.persona}, {text}",
                platform_message_id=str(self.count),
                sent_at=START + timedelta(minutes=minutes),
            )
        )
        while await self.worker.run_once():
            pass
        return result.notice


async def populate(store: Store, persona: str = "pirate", registry: PersonaRegistry | None = None) -> Chat:
    """Five users talk to `persona`; three conversations of two opted-in users are exportable."""
    chat = Chat(store, persona, registry)
    assert "Thank you" in (await chat.say("ada", "/optin", minutes=0))
    await chat.say("ada", "where be the treasure?", minutes=1)
    await chat.say("ada", "and the map?", minutes=2)
    # After a long silence: a new conversation.
    await chat.say("ada", "a new day, a new question", minutes=200)
    await chat.say("bob", "i never opted in", minutes=3)
    await chat.say("cat", "/optin", minutes=0)
    await chat.say("cat", "i will change my mind", minutes=4)
    assert "will not be used" in (await chat.say("cat", "/optout", minutes=5))
    await chat.say("dan", "/optin", minutes=0, chat="tavern")
    await chat.say("dan", "forget me later", minutes=6, chat="tavern")
    await chat.say("eve", "before my optin", minutes=1)
    await chat.say("eve", "/optin", minutes=10)
    await chat.say("eve", "after my optin", minutes=11)
    assert "erased" in (await chat.say("dan", "/forget confirm", minutes=7, chat="tavern"))
    return chat


def words(conversations: list) -> str:  # type: ignore[type-arg]
    return json.dumps([c.messages for c in conversations])


async def test_export_holds_only_opted_in_users_who_did_not_forget(store: Store) -> None:
    await populate(store)
    async with store.transaction() as session:
        found = await collect_conversations(session, "pirate")
    assert [c.messages for c in found] == [
        [
            {"role": "user", "content": "where be the treasure?"},
            {"role": "assistant", "content": "Arr, where be the treasure?!"},
            {"role": "user", "content": "and the map?"},
            {"role": "assistant", "content": "Arr, and the map?!"},
        ],
        [
            {"role": "user", "content": "after my optin"},
            {"role": "assistant", "content": "Arr, after my optin!"},
        ],
        [
            {"role": "user", "content": "a new day, a new question"},
            {"role": "assistant", "content": "Arr, a new day, a new question!"},
        ],
    ]
    text = words(found)
    for leaked in ("never opted in", "change my mind", "forget me", "before my optin", "/optin"):
        assert leaked not in text
    assert [sorted(c.users) for c in found] == [["console:ada"], ["console:eve"], ["console:ada"]]


async def test_export_since_and_reset(store: Store) -> None:
    chat = Chat(store)
    await chat.say("ada", "/optin", minutes=0)
    await chat.say("ada", "first", minutes=1)
    await chat.say("ada", "/reset", minutes=2)
    await chat.say("ada", "second", minutes=3)
    async with store.transaction() as session:
        split = await collect_conversations(session, "pirate")
        later = await collect_conversations(session, "pirate", since=START + timedelta(minutes=2))
    assert [len(c.messages) for c in split] == [2, 2]  # /reset starts a new conversation
    assert [c.messages[0]["content"] for c in later] == ["second"]


async def test_earlier_exports_are_scrubbed_after_optout_and_forget(store: Store, tmp_path: Path) -> None:
    chat = await populate(store)
    root = tmp_path / "exports"
    out = root / "pirate" / "first.jsonl"
    result = await export_persona(store, "pirate", out, sources=True)
    assert result.conversations == 3 and result.users == 2
    first = json.loads(out.read_text().splitlines()[0])
    assert first["messages"][0]["role"] == "user"

    await chat.say("ada", "/optout", minutes=300)
    assert await scrub_exports(store, root) == 2
    assert "treasure" not in out.read_text() and "after my optin" in out.read_text()

    await chat.say("eve", "/forget confirm", minutes=301)
    assert await scrub_exports(store, root) == 1
    assert out.read_text() == ""
    assert await scrub_exports(store, root) == 0  # nothing left to remove


def test_dataset_export_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'bot.db'}"
    monkeypatch.setenv("PERSONABOT_DATABASE_URL", url)

    async def go() -> None:
        store = Store(url)
        await store.upgrade()
        await populate(store)
        await store.close()

    asyncio.run(go())
    out = tmp_path / "pirate.jsonl"
    assert main(["dataset", "export", "pirate", "--out", str(out)]) == 0
    assert "exported 3 conversation(s), 8 turns, from 2 user(s)" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3
    assert not (
        tmp_path / "pirate.jsonl.sources.json"
    ).exists()  # only the data folder's exports keep sources

    assert (
        main(
            [
                "dataset",
                "export",
                "pirate",
                "--out",
                str(out),
                "--since",
                (START + timedelta(minutes=100)).isoformat(),
            ]
        )
        == 0
    )
    assert len(out.read_text().splitlines()) == 1

    assert main(["dataset", "export", "pirate"]) == 0  # default: into the data folder, with sources
    printed = capsys.readouterr().out
    default = Path(printed.rsplit(" to ", 1)[1].strip())
    assert (
        default.parent == tmp_path / "data" / "exports" / "pirate"
        and default.with_name(default.name + ".sources.json").is_file()
    )

    assert main(["dataset", "export", "kraken"]) == 2
    assert "unknown persona 'kraken'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["dataset", "export", "pirate", "--since", "last tuesday"])
    assert exc.value.code == 2
    assert "'last tuesday' is not a date like 2026-01-31" in capsys.readouterr().err
