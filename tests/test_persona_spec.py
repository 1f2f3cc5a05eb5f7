"""persona.toml: validation, and errors that name the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.errors import PersonaError
from personas.registry import BUILTIN_DIR, PersonaRegistry
from personas.spec import PersonaSpec, load_spec

GOOD = """
name = "Tester"
system_prompt = "You test."
greeting = "Hi."
dialogues = ["d.jsonl"]

[sampling]
temperature = 0.5
top_p = 0.9

[[schedule]]
cron = "0 9 * * mon-fri"
prompt = "Say good morning."
timezone = "Europe/Berlin"
channels = ["discord:123", "telegram:-100/7"]
"""


def persona_folder(root: Path, slug: str = "tester", toml: str = GOOD, dialogues: bool = True) -> Path:
    folder = root / slug
    folder.mkdir(parents=True)
    (folder / "persona.toml").write_text(toml)
    if dialogues:
        row = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        (folder / "d.jsonl").write_text(json.dumps(row) + "\n")
    return folder


def error_of(path: Path) -> str:
    with pytest.raises(PersonaError) as info:
        load_spec(path)
    return str(info.value)


def test_a_good_spec_loads_with_defaults(tmp_path: Path) -> None:
    spec = load_spec(persona_folder(tmp_path) / "persona.toml")
    assert spec.slug == "tester"  # from the folder name
    assert spec.template == "model"
    assert spec.sampling.temperature == 0.5 and spec.sampling.max_new_tokens == 256
    assert spec.triggers.direct_messages and spec.triggers.name
    assert spec.schedule[0].timezone == "Europe/Berlin"
    assert spec.lora.r == 16 and spec.lora.alpha == 32


def test_top_p_error_names_file_and_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = persona_folder(tmp_path / "personas", "pirate", GOOD.replace("top_p = 0.9", "top_p = 1.5"))
    monkeypatch.chdir(tmp_path)
    assert (
        error_of(folder / "persona.toml") == "personas/pirate/persona.toml: sampling.top_p: must be in (0, 1]"
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("top_p = 0.9", "top_p = 0"), "sampling.top_p: must be in (0, 1]"),
        (
            ("temperature = 0.5", "temperature = -1"),
            "sampling.temperature: Input should be greater than or equal to 0",
        ),
        (
            ("[sampling]", "[sampling]\nmax_new_tokens = 0"),
            "sampling.max_new_tokens: Input should be greater than or equal to 1",
        ),
        (("[sampling]", "[sampling]\ntopp = 0.5"), "sampling.topp: unknown key (a typo?)"),
        (('name = "Tester"', 'name = ""'), "name: String should have at least 1 character"),
        (
            ('name = "Tester"', 'name = "Tester"\ntemplate = "llama3"'),
            "template: Input should be 'model', 'llama2' or 'chatml'",
        ),
        (('name = "Tester"', 'name = "Tester"\nslug = "Bad Slug"'), "slug: must be 1-64 lowercase letters"),
        (
            ('name = "Tester"', 'name = "Tester"\ncontext_window = 200'),
            "context_window: must be larger than sampling.max_new_tokens (256)",
        ),
        (
            ('cron = "0 9 * * mon-fri"', 'cron = "61 9 * * *"'),
            "schedule.0.cron: invalid cron expression '61 9 * * *'",
        ),
        (
            ('cron = "0 9 * * mon-fri"', 'cron = "every morning"'),
            "schedule.0.cron: invalid cron expression 'every morning'",
        ),
        (
            ('timezone = "Europe/Berlin"', 'timezone = "Mars/Olympus"'),
            "schedule.0.timezone: unknown time zone 'Mars/Olympus'",
        ),
        (('"discord:123"', '"#general"'), "schedule.0.channels: '#general' is not a `platform:id` channel"),
        (
            ('name = "Tester"', 'name = "Tester"\nstyle_check = "limerick"'),
            "style_check: Input should be 'pirate' or 'haiku'",
        ),
        (
            ('name = "Tester"', 'name = "Tester"\n[triggers]\nkeywords = [" "]'),
            "triggers.keywords: keywords must not be empty",
        ),
    ],
)
def test_each_bad_field_is_named(tmp_path: Path, change: tuple[str, str], expected: str) -> None:
    toml = GOOD.replace(*change)
    assert toml != GOOD
    folder = persona_folder(tmp_path, toml=toml)
    message = error_of(folder / "persona.toml")
    assert message.startswith(f"{folder / 'persona.toml'}: {expected}"), message
    assert "\n" not in message


def test_malformed_toml_names_the_file_and_line(tmp_path: Path) -> None:
    folder = persona_folder(tmp_path, toml='name = "Tester"\nsystem_prompt = "unterminated\n')
    message = error_of(folder / "persona.toml")
    assert message.startswith(f"{folder / 'persona.toml'}: invalid TOML: ")
    assert "line 2" in message


def test_missing_dialogue_file_is_named(tmp_path: Path) -> None:
    folder = persona_folder(tmp_path, dialogues=False)
    assert error_of(folder / "persona.toml") == (
        f"{folder / 'persona.toml'}: dialogues.0: file not found: {folder / 'd.jsonl'}"
    )


def test_several_problems_come_on_one_line(tmp_path: Path) -> None:
    toml = GOOD.replace("top_p = 0.9", "top_p = 2").replace("temperature = 0.5", 'temperature = "hot"')
    message = error_of(persona_folder(tmp_path, toml=toml) / "persona.toml")
    assert "sampling.temperature" in message and "sampling.top_p" in message and "\n" not in message


def test_builtin_personas_load_with_their_styles() -> None:
    registry = PersonaRegistry.discover(entry_points=False)
    assert [p.slug for p in registry.all()] == ["assistant", "pirate", "poet"]
    pirate, poet = registry.get("pirate"), registry.get("poet")
    assert pirate.spec.style_check == "pirate" and poet.spec.style_check == "haiku"
    assert pirate.spec.name == "Captain Saltbeard" and poet.spec.name == "Basho-bot"
    for persona, count in ((pirate, 255), (poet, 276)):
        assert persona.source == "builtin"
        assert persona.spec.template == "model"
        assert persona.spec.greeting and persona.spec.system_prompt
        (path,) = persona.dialogue_paths()
        assert sum(1 for line in path.open() if line.strip()) == count
    assert poet.spec.triggers.keywords == ["haiku"]
    assert pirate.spec.schedule[0].cron == "0 9 * * *"


def test_spec_model_is_the_documented_shape() -> None:
    fields = set(PersonaSpec.model_fields)
    assert {
        "slug",
        "name",
        "description",
        "system_prompt",
        "greeting",
        "template",
        "sampling",
        "context_window",
        "triggers",
        "schedule",
        "lora",
        "training",
        "dialogues",
    } <= fields
    assert (BUILTIN_DIR / "assistant" / "persona.toml").is_file()
