"""SillyTavern macros and greetings: the same expansion in every field, seeded where it would vary."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from personas.cards import import_card, persona_to_card
from personas.macros import TRAINING_CLOCK, MacroContext, expand

CTX = MacroContext("Aq", "Kazuma", "aqua", datetime(2026, 12, 2, 15, 4), timedelta(minutes=90))


def test_names_and_old_style_tags() -> None:
    assert expand("{{char}} and {{ User }} / <BOT> and <user>", CTX) == "Aq and Kazuma / Aq and Kazuma"
    assert expand("{{original}}x", CTX) == "x" and expand("{{unknown}} {{ also:thing }}", CTX) == (
        "{{unknown}} {{ also:thing }}"
    )


def test_clock_macros() -> None:
    assert expand("{{time}} on {{date}}, idle {{idle_duration}}", CTX) == (
        "3:04 PM on December 2, 2026, idle 1 hour"
    )
    assert expand("{{idle_duration}}", MacroContext("a", "b", "c")) == "a while"
    assert expand("{{date}}", MacroContext("a", "b", "c")) == f"January {TRAINING_CLOCK.day}, 2024"


def test_random_pick_and_roll_are_seeded_by_persona_and_field() -> None:
    text = "{{random:red,green,blue}} {{pick::one::two::three}} {{roll:2d6+3}} {{roll:20}} {{random:a\\,b,c}}"
    first = expand(text, CTX, "description")
    assert first == expand(text, CTX, "description")  # the same text every time: training == replies
    colour, pick, two_dice, d20, comma = first.split(" ")
    assert colour in ("red", "green", "blue") and pick in ("one", "two", "three")
    assert 5 <= int(two_dice) <= 15 and 1 <= int(d20) <= 20 and comma in ("a,b", "c")
    # Other personas and fields get their own picks (over many tries, not always the same).
    picks = {expand("{{random:1,2,3,4,5,6,7,8}}", MacroContext("a", "b", f"p{i}"), "f") for i in range(30)}
    assert len(picks) > 3
    assert expand("{{roll:banana}}", CTX) == "{{roll:banana}}"


def card(**data: Any) -> dict[str, Any]:
    base = {
        "name": "Aqua Marine",
        "nickname": "Aq",
        "description": "{{char}} likes {{random:tea,coffee}}.",
        "personality": "",
        "scenario": "",
        "first_mes": "Hi {{user}}, I'm {{char}}!",
        "alternate_greetings": ["Yo {{user}}.", "{{char}} waves."],
        "mes_example": "<START>\n{{user}}: hey\n{{char}}: I'm {{char}}, {{random:tea,coffee}} time.",
        "system_prompt": "{{original}} Play {{char}}.",
        "post_history_instructions": "Stay as {{char}}. {{original}}",
    }
    base.update(data)
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": base}


def test_nickname_drives_char_in_every_field(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(card()))
    persona = import_card(path, tmp_path / "p", user="Kazuma")
    prompt = persona.system_prompt()
    assert prompt is not None and "{{" not in prompt and "Aqua Marine" not in prompt
    assert prompt.startswith("Play Aq.\n\nAq likes ") and prompt.endswith("Stay as Aq.")  # {{original}} gone
    drink = prompt.split("likes ")[1].split(".")[0]
    assert drink in ("tea", "coffee")
    assert persona.greetings() == ["Hi Kazuma, I'm Aq!", "Yo Kazuma.", "Aq waves."]
    rows = (persona.folder / "dialogues.jsonl").read_text()
    assert "I'm Aq, " in rows and "{{" not in rows
    # The card keeps its macros.
    assert persona_to_card(persona) == card()


def test_greeting_choice(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(card()))
    persona = import_card(path, tmp_path / "p")
    assert persona.spec.greeting_choice == "first"
    assert {persona.greeting(random.Random(i)) for i in range(20)} == {"Hi User, I'm Aq!"}
    toml = persona.folder / "persona.toml"
    toml.write_text(toml.read_text().replace('greeting_choice = "first"\n', "") + "")
    text = toml.read_text().replace('template = "model"', 'template = "model"\ngreeting_choice = "random"')
    toml.write_text(text)
    from personas.registry import load_folder

    chosen = load_folder(persona.folder, "user:test")
    seen = {chosen.greeting(random.Random(i)) for i in range(40)}
    assert seen == set(chosen.greetings()) and len(seen) == 3
    # Choosing how to greet is a persona setting, not a card edit: the card is unchanged.
    assert persona_to_card(chosen) == card()


async def test_start_command_sends_the_persona_greeting_expanded(tmp_path: Path) -> None:
    """/start (Telegram opens chats with it) answers with the imported card's greeting, macros expanded."""
    from bot.config import load_settings
    from bot.dispatch import Dispatcher
    from bot.events import AuthorRef, ChannelKind, ChannelRef, Incoming
    from bot.store import Store
    from personas.registry import PersonaRegistry

    path = tmp_path / "c.json"
    path.write_text(json.dumps(card()))
    persona = import_card(path, tmp_path / "personas", user="Kazuma")
    registry = PersonaRegistry.discover(tmp_path / "personas", entry_points=False)
    settings = load_settings().model_copy(update={"default_persona": persona.slug})
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    await store.upgrade()
    try:
        channel = ChannelRef("console", "c1", ChannelKind.DIRECT)
        event = Incoming("console", channel, AuthorRef("console", "u", "U"), "/start", "m1")
        result = await Dispatcher(settings, store, registry).handle(event)
    finally:
        await store.close()
    assert result.notice == "Hi Kazuma, I'm Aq!"


def test_greetings_read_the_clock_they_are_given(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(card(first_mes="Good day, it is {{date}}.")))
    persona = import_card(path, tmp_path / "p")
    assert persona.greeting(now=datetime(2026, 3, 4, 9, 0)) == "Good day, it is March 4, 2026."
