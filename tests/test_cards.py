"""Character cards: V1, V2 and V3, as JSON and inside PNGs; import, export and the round trip."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bot.cli import main
from bot.errors import PersonaError
from personas.cards import export_card, import_card, parse_examples, persona_to_card, read_card
from personas.registry import PersonaRegistry, load_folder

MES_EXAMPLE = (
    "<START>\n"
    "{{user}}: Hi Aqua, who are you?\n"
    "{{char}}: I'm Aqua, goddess of water! Worship me, {{user}}.\n"
    "{{user}}: Why would I?\n"
    "{{char}}: Because I'm *amazing*.\n"
    "I can even purify lakes.\n"
    "<START>\n"
    "{{User}}: Can you help me?\n"
    "{{Char}}: Of course, {{user}}!\n"
    "<START>\n"
    "{{user}}: this block has no reply\n"
)


def v2_card(**changes: Any) -> dict[str, Any]:
    data = {
        "name": "Aqua",
        "description": "{{char}} is the goddess of water. She is cheerful but lazy.",
        "personality": "cheerful, vain, kind",
        "scenario": "{{user}} meets {{char}} at the guild hall.",
        "first_mes": "Hello {{user}}! I'm {{char}}, the goddess you've been waiting for.",
        "mes_example": MES_EXAMPLE,
        "creator_notes": "A goddess who needs your help.\nSecond line.",
        "system_prompt": "Write {{char}}'s next reply in a fictional chat. {{original}}",
        "post_history_instructions": "Stay in character as {{char}}.",
        "alternate_greetings": ["Hi again, {{user}}!"],
        "character_book": {
            "name": "Lore",
            "entries": [{"keys": ["guild"], "content": "The guild is in Axel."}],
        },
        "tags": ["goddess", "comedy"],
        "creator": "someone",
        "character_version": "1.2",
        "extensions": {"talkativeness": "0.5", "fav": False, "depth_prompt": {"prompt": "x", "depth": 4}},
        "some_future_field": {"kept": [1, 2, 3]},
    }
    data.update(changes)
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data, "create_date": "2024-1-1"}


def write_json(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def write_png(path: Path, chunks: dict[str, Any]) -> Path:
    """A real PNG image (Pillow) with the given text chunks, JSON values base64-encoded."""
    info = PngInfo()
    for key, value in chunks.items():
        text = value if isinstance(value, str) else base64.b64encode(json.dumps(value).encode()).decode()
        info.add_text(key, text)
    Image.new("RGB", (32, 48), (10, 120, 200)).save(path, format="PNG", pnginfo=info)
    return path


def test_v2_card_becomes_a_persona(tmp_path: Path) -> None:
    card = write_json(tmp_path / "aqua.json", v2_card())
    persona = import_card(card, tmp_path / "personas", user="Kazuma")
    spec = persona.spec
    assert persona.slug == "aqua" and spec.name == "Aqua"
    assert spec.system_prompt == ""  # the card's fields are kept apart, in [character]
    assert persona.system_prompt() == (
        "Write Aqua's next reply in a fictional chat.\n\n"
        "Aqua is the goddess of water. She is cheerful but lazy.\n\n"
        "Aqua's personality: cheerful, vain, kind\n\n"
        "Scenario: Kazuma meets Aqua at the guild hall.\n\n"
        "Stay in character as Aqua."
    )
    assert persona.greeting() == "Hello Kazuma! I'm Aqua, the goddess you've been waiting for."
    assert spec.description == "A goddess who needs your help."
    rows = [json.loads(line) for line in (persona.folder / "dialogues.jsonl").read_text().splitlines()]
    assert rows == [
        {
            "messages": [
                {"role": "user", "content": "Hi Aqua, who are you?"},
                {"role": "assistant", "content": "I'm Aqua, goddess of water! Worship me, Kazuma."},
                {"role": "user", "content": "Why would I?"},
                {"role": "assistant", "content": "Because I'm *amazing*.\nI can even purify lakes."},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "Can you help me?"},
                {"role": "assistant", "content": "Of course, Kazuma!"},
            ]
        },
    ]
    # The imported persona is found like any other user persona.
    registry = PersonaRegistry.discover(tmp_path / "personas", entry_points=False)
    assert registry.get("aqua").source.startswith("user:")


def test_v2_round_trip_gives_an_equivalent_card(tmp_path: Path) -> None:
    original = v2_card()
    persona = import_card(write_json(tmp_path / "aqua.json", original), tmp_path / "personas")
    assert persona_to_card(persona) == original  # unknown fields, extensions and lorebook included


def test_round_trip_carries_later_edits(tmp_path: Path) -> None:
    persona = import_card(write_json(tmp_path / "aqua.json", v2_card()), tmp_path / "personas")
    toml = persona.folder / "persona.toml"
    text = toml.read_text().replace("Hello {{user}}!", "Greetings, mortal {{user}}!")
    toml.write_text(text)
    edited = load_folder(persona.folder, "user:test")
    card = persona_to_card(edited)
    assert card["data"]["first_mes"] == edited.spec.greeting
    assert card["data"]["description"] == v2_card()["data"]["description"]  # untouched fields stay
    assert card["data"]["extensions"] == v2_card()["data"]["extensions"]
    # New dialogues change mes_example.
    with (persona.folder / "dialogues.jsonl").open("a") as fh:
        fh.write(
            json.dumps(
                {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
            )
        )
        fh.write("\n")
    card = persona_to_card(load_folder(persona.folder, "user:test"))
    assert card["data"]["mes_example"].endswith("<START>\n{{user}}: Q\n{{char}}: A")


def test_v1_flat_card(tmp_path: Path) -> None:
    v1 = {
        "name": "Old Timer",
        "description": "{{char}} remembers the old days.",
        "personality": "grumpy",
        "scenario": "",
        "first_mes": "Back in my day, <USER>...",
        "mes_example": "<START>\n<USER>: Hello\n<BOT>: Hmph. Hello.",
        "metadata": {"source": "tavern"},
    }
    persona = import_card(write_json(tmp_path / "old.json", v1), tmp_path / "personas", user="Kid")
    assert persona.slug == "old-timer"
    assert persona.system_prompt() == "Old Timer remembers the old days.\n\nOld Timer's personality: grumpy"
    assert persona.greeting() == "Back in my day, Kid..."
    card = persona_to_card(persona)
    assert card["spec"] == "chara_card_v2"
    data = card["data"]
    assert {k: data[k] for k in v1} == v1  # every V1 field, the unknown one too
    assert data["alternate_greetings"] == [] and data["extensions"] == {}


def test_pygmalion_style_field_names(tmp_path: Path) -> None:
    card = read_card(
        write_json(
            tmp_path / "p.json",
            {"char_name": "Pyg", "char_persona": "shy", "char_greeting": "hi", "example_dialogue": "You: a"},
        )
    )
    assert (card.name, card.data["personality"], card.data["first_mes"]) == ("Pyg", "shy", "hi")


def test_v3_card_in_png_wins_over_chara(tmp_path: Path) -> None:
    v3 = {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {
            **v2_card()["data"],
            "name": "Aqua Three",
            "nickname": "Aq",
            "group_only_greetings": [],
            "assets": [{"type": "icon", "uri": "ccdefault:", "name": "main", "ext": "png"}],
        },
    }
    png = write_png(tmp_path / "aqua.png", {"chara": v2_card(), "ccv3": v3})
    persona = import_card(png, tmp_path / "personas")
    assert persona.slug == "aqua-three"
    assert (persona.folder / "avatar.png").read_bytes() == png.read_bytes()
    assert persona.system_prompt() is not None and "Aq is the goddess" in persona.system_prompt()
    card = persona_to_card(persona)
    assert card == v3  # exported as imported: V3, nickname and assets included


def test_png_with_only_chara_chunk_and_export_back_to_png(tmp_path: Path) -> None:
    original = v2_card()
    png = write_png(tmp_path / "aqua.png", {"chara": original, "Software": "paint"})
    persona = import_card(png, tmp_path / "personas", slug="goddess")
    assert persona.slug == "goddess"
    out = tmp_path / "out.png"
    export_card(persona, out)
    with Image.open(out) as image:  # still a valid image, with one card chunk
        assert image.size == (32, 48)
        assert image.text["Software"] == "paint"
    assert read_card(out).data == original["data"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is { not json", "not a character card: invalid JSON at line 1 column 1"),
        (b'["a", "list"]', "not a character card (expected a JSON object)"),
        (b'{"spec": "chara_card_v9", "data": {}}', "spec: unknown card spec 'chara_card_v9'"),
        (b'{"spec": "chara_card_v2", "data": "x"}', "data: expected an object in a chara_card_v2 card"),
        (b'{"spec": "chara_card_v2", "data": {"name": ""}}', "data.name: missing or empty"),
        (b'{"name": "X", "description": 5}', "description: expected a string, got int"),
        (b'{"name": "X", "tags": "a,b"}', "tags: expected a list of strings"),
    ],
)
def test_bad_json_cards_are_one_error_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "card.json"
    path.write_bytes(content)
    with pytest.raises(PersonaError) as info:
        import_card(path, tmp_path / "personas")
    assert str(info.value).startswith(f"{path}: {message}"), str(info.value)
    assert not (tmp_path / "personas").exists()


def test_a_card_that_makes_an_invalid_persona_writes_nothing(tmp_path: Path) -> None:
    card = v2_card()
    card["data"]["extensions"]["personabot"] = {"sampling": {"top_p": 5}}
    path = write_json(tmp_path / "aqua.json", card)
    with pytest.raises(PersonaError) as info:
        import_card(path, tmp_path / "personas")
    assert str(info.value) == f"{path} as persona: sampling.top_p: must be in (0, 1]"
    assert not (tmp_path / "personas").exists()


def test_a_leftover_staging_folder_is_not_a_persona(tmp_path: Path) -> None:
    """An import killed half way leaves `.import-*`; discovery skips it and the import can be redone."""
    import_card(write_json(tmp_path / "aqua.json", v2_card()), tmp_path / "personas")
    leftover = tmp_path / "personas" / ".import-aqua-x"
    leftover.mkdir()
    (leftover / "persona.toml").write_text((tmp_path / "personas" / "aqua" / "persona.toml").read_text())
    registry = PersonaRegistry.discover(tmp_path / "personas", entry_points=False)
    assert "aqua" in registry


def test_png_without_card_chunk(tmp_path: Path) -> None:
    png = write_png(tmp_path / "plain.png", {"Comment": "just a picture"})
    with pytest.raises(PersonaError) as info:
        read_card(png)
    assert str(info.value) == f"{png}: PNG holds no character card (no 'chara' or 'ccv3' text chunk)"
    bad = write_png(tmp_path / "bad.png", {"chara": "!!not base64 json!!"})
    with pytest.raises(PersonaError, match="PNG chunk 'chara' is not base64-encoded JSON"):
        read_card(bad)


def test_mes_example_edge_cases() -> None:
    text = (
        "preamble without speaker\n"
        "<start>\n"
        "Aqua: I speak first.\n"
        "Kazuma: then me\n"
        "Kazuma: twice\n"
        "{{ char }}:no space after colon\n"
        "\n"
        "<START>\n"
        "{{char}}:   \n"
    )
    assert parse_examples(text, "Aqua", "Kazuma") == [
        [
            {"role": "assistant", "content": "I speak first."},
            {"role": "user", "content": "then me\ntwice"},
            {"role": "assistant", "content": "no space after colon"},
        ]
    ]
    # A user called "Charlie" is still the user.
    assert parse_examples("<START>\nCharlie: hi\n{{char}}: yo", "Bot", "Charlie")[0][0]["role"] == "user"


def _cli(*args: str) -> int:
    return main(["persona", *args])


def test_cli_import_and_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    original = v2_card()
    write_json(tmp_path / "aqua.json", original)
    assert _cli("import-card", "aqua.json") == 0
    out = capsys.readouterr().out
    assert "imported Aqua as persona 'aqua'" in out and "2 example dialogues" in out
    assert (tmp_path / "data" / "personas" / "aqua" / "persona.toml").is_file()
    assert _cli("list") == 0
    assert "aqua" in capsys.readouterr().out
    assert _cli("export-card", "aqua", "--out", "back.json") == 0
    assert json.loads((tmp_path / "back.json").read_text()) == original
    # Importing again without --force is refused; with it, replaced.
    assert _cli("import-card", "aqua.json") == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert _cli("import-card", "aqua.json", "--force") == 0


def test_cli_refuses_a_slug_taken_by_a_builtin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = write_json(tmp_path / "p.json", v2_card(name="Pirate"))
    assert _cli("import-card", str(card)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("personabot: error: persona 'pirate' already exists (builtin,")
    assert err.endswith("choose another with --slug") and "\n" not in err
    assert not (tmp_path / "data" / "personas").exists()


def test_cli_bad_card_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    assert _cli("import-card", str(bad)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"personabot: error: {bad}: not a character card")
    png = write_png(tmp_path / "plain.png", {})
    assert _cli("import-card", str(png)) == 2
    assert "PNG holds no character card" in capsys.readouterr().err
    assert not (tmp_path / "data" / "personas").exists()


def test_builtin_persona_exports_and_reimports_with_its_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pirate.png"
    assert _cli("export-card", "pirate", "--out", str(out), "--examples", "3") == 0
    card = read_card(out)
    data = card.data
    assert data["name"] == "Captain Saltbeard" and data["mes_example"].count("<START>") == 3
    assert data["extensions"]["personabot"]["sampling"]["top_k"] == 50
    with Image.open(io.BytesIO(out.read_bytes())) as image:
        assert image.format == "PNG"
    registry = PersonaRegistry.discover(entry_points=False)
    persona = import_card(out, tmp_path / "personas", slug="pirate2")
    original = registry.get("pirate").spec
    assert persona.system_prompt() == registry.get("pirate").system_prompt()
    assert persona.greeting() == registry.get("pirate").greeting()
    assert persona.spec.sampling == original.sampling and persona.spec.triggers == original.triggers
    assert persona.spec.schedule == original.schedule


# -- built from the published specs: CRLF text, non-ASCII names, V3 in PNG and CharX, lorebook-only cards

CRLF_DATA = {
    "name": "Seraphina",
    "description": "{{char}} is a guardian of the forest.\r\nShe heals the wounded.\r\n",
    "personality": "kind, protective\r\ncalm",
    "scenario": "{{user}} wakes up in {{char}}'s glade.",
    "first_mes": "*{{char}} smiles.*\r\nYou're awake, {{user}}.",
    "mes_example": "<START>\r\n{{user}}: Where am I?\r\n{{char}}: In my glade.\r\n",
    "creator_notes": "",
    "system_prompt": "",
    "post_history_instructions": "",
    "alternate_greetings": ["Hello\r\nagain, {{user}}."],
    "tags": [],
    "creator": "",
    "character_version": "",
    "extensions": {},
}


def rendered_prompt(persona: Any) -> str:
    """The prompt the persona answers a guild question from: renderer, system prompt and lore."""
    from bot.prompting import ChatRenderer, Turn
    from tests.tiny import byte_level_tokenizer

    renderer = ChatRenderer(byte_level_tokenizer(), "chatml")
    turns = [Turn("user", "Tell me about the guild and the old map.")]
    return renderer.render_prompt(
        turns, system=persona.system_prompt(), max_prompt_tokens=10**6, lore=persona.lorebook
    ).text


def stable_round_trip(path: Path, root: Path, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """import -> prompt -> export -> import again: the second import renders and exports the same."""
    first = import_card(path, root / "one", **kwargs)
    prompt = rendered_prompt(first)
    exported = persona_to_card(first)
    again = write_json(root / "again.json", exported)
    second = import_card(again, root / "two", slug=first.slug, **kwargs)
    assert rendered_prompt(second) == prompt
    assert second.greetings() == first.greetings()
    assert second.spec.character == first.spec.character
    assert second.lorebook == first.lorebook
    assert persona_to_card(second) == exported
    return first, exported


def test_crlf_card_round_trips_byte_for_byte(tmp_path: Path) -> None:
    original = {"spec": "chara_card_v2", "spec_version": "2.0", "data": CRLF_DATA}
    persona, exported = stable_round_trip(write_json(tmp_path / "s.json", original), tmp_path)
    assert exported == original  # CRLF kept in every field, nothing counted as an edit
    toml = (persona.folder / "persona.toml").read_bytes()
    assert b"\r" not in toml  # the persona's own copy is plain LF text
    assert persona.system_prompt() == (
        "Seraphina is a guardian of the forest.\nShe heals the wounded.\n\n"
        "Seraphina's personality: kind, protective\ncalm\n\n"
        "Scenario: User wakes up in Seraphina's glade."
    )
    # Also through a PNG.
    png = write_png(tmp_path / "s.png", {"chara": original})
    assert persona_to_card(import_card(png, tmp_path / "png")) == original


def test_an_edit_changes_only_the_edited_field_and_keeps_its_style(tmp_path: Path) -> None:
    original = {"spec": "chara_card_v2", "spec_version": "2.0", "data": CRLF_DATA}
    persona = import_card(write_json(tmp_path / "s.json", original), tmp_path / "p")
    toml = persona.folder / "persona.toml"
    text = toml.read_text(encoding="utf-8")
    assert 'personality = """\nkind, protective\ncalm"""' in text
    toml.write_text(text.replace("kind, protective\ncalm", "kind, protective\nfierce to {{user}}'s foes"))
    card = persona_to_card(load_folder(persona.folder, "user:test"))
    changed = {k for k in CRLF_DATA if card["data"][k] != CRLF_DATA[k]}
    assert changed == {"personality"}
    assert card["data"]["personality"] == "kind, protective\r\nfierce to {{user}}'s foes"  # macro kept


def test_legacy_card_json_exports_unedited_fields_as_they_were(tmp_path: Path) -> None:
    """A persona imported before [character] existed (card.json format 1) still exports faithfully."""
    persona = import_card(write_json(tmp_path / "a.json", v2_card()), tmp_path / "p")
    folder = persona.folder
    record = json.loads((folder / "card.json").read_text())
    flat = persona.system_prompt()
    record = {
        "format": 1,
        "source_spec": "v2",
        "spec_version": "2.0",
        "top_level": record["top_level"],
        "data": record["data"],
        "derived": {
            "name": "Aqua",
            "system_prompt": flat,
            "greeting": persona.greeting(),
            "dialogues_sha256": record["dialogues_sha256"],
        },
    }
    (folder / "card.json").write_text(json.dumps(record))
    (folder / "persona.toml").write_text(
        'name = "Aqua"\ndialogues = ["dialogues.jsonl"]\n'
        f"system_prompt = {json.dumps(flat)}\ngreeting = {json.dumps(persona.greeting())}\n"
    )
    (folder / "lorebook.json").unlink()
    assert persona_to_card(load_folder(folder, "user:test")) == v2_card()


@pytest.mark.parametrize(
    ("name", "slug"),
    [("李白", "libai"), ("Сергей", "sergey"), ("Zoë", "zoe"), ("Ελένη", "eleni"), ("初音ミク", "chuyinmiku")],
)
def test_slugs_for_any_script(tmp_path: Path, name: str, slug: str) -> None:
    persona = import_card(write_json(tmp_path / "c.json", v2_card(name=name)), tmp_path / "p")
    assert persona.slug == slug and persona.spec.name == name


def test_a_name_without_transliteration_gets_a_stable_hash_slug(tmp_path: Path) -> None:
    from personas.cards import slugify

    name = "\u3000\u200b"  # only blank characters: nothing to transliterate
    assert slugify(name) == slugify(name) and re.fullmatch(r"card-[0-9a-f]{8}", slugify(name))
    assert slugify("---") != slugify("***")
    persona = import_card(
        write_json(tmp_path / "c.json", v2_card(name="李白")), tmp_path / "p", slug="poet-li"
    )
    assert persona.slug == "poet-li"  # --slug still overrides


def test_cli_imports_a_chinese_name_without_slug(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    card = write_json(tmp_path / "li.json", v2_card(name="李白"))
    assert _cli("import-card", str(card)) == 0
    assert "as persona 'libai'" in capsys.readouterr().out


def _bomb_png(path: Path, *, before_image: bool) -> Path:
    """A valid 1x1 PNG with a zTXt 'chara' chunk whose 64 MB of text compresses to ~64 KB."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    raw = buffer.getvalue()
    bomb = chunk(b"zTXt", b"chara\0\0" + zlib.compress(b"A" * (64 * 1024 * 1024), 9))
    assert len(bomb) < 100_000
    at = raw.index(b"IDAT") - 4 if before_image else raw.index(b"IEND") - 4
    path.write_bytes(raw[:at] + bomb + raw[at:])
    return path


@pytest.mark.parametrize("before_image", [True, False])
def test_decompression_bomb_png_is_one_clear_error(tmp_path: Path, before_image: bool) -> None:
    png = _bomb_png(tmp_path / "bomb.png", before_image=before_image)
    with pytest.raises(PersonaError) as info:
        import_card(png, tmp_path / "personas")
    assert str(info.value).startswith(f"{png}: PNG text chunk refused: Decompressed data too large")
    assert not (tmp_path / "personas").exists()


def test_huge_image_and_huge_file_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import struct
    import zlib

    from personas import card_files

    # An IHDR claiming 50000 x 50000 pixels, with nothing behind it: refused before any pixel is decoded.
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    body = b"IHDR" + ihdr
    header = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", zlib.crc32(body))
    big = tmp_path / "big.png"
    big.write_bytes(header + b"\0\0\0\0IEND\xaeB`\x82")
    with pytest.raises(
        PersonaError, match=r"big.png: (refused as a decompression bomb|image of 50000x50000)"
    ):
        read_card(big)
    monkeypatch.setattr(card_files, "MAX_CARD_BYTES", 1000)
    card = write_json(tmp_path / "long.json", v2_card(description="x" * 2000))
    with pytest.raises(PersonaError, match=r"long.json: \d+ bytes is too large for a character card"):
        read_card(card)


def v3_card(**changes: Any) -> dict[str, Any]:
    data = {
        **v2_card()["data"],
        "name": "Aqua Three",
        "nickname": "Aq",
        "group_only_greetings": ["Hi all!"],
        "creation_date": 1700000000,
        "assets": [
            {"type": "icon", "uri": "embeded://assets/icon/images/main.png", "name": "main", "ext": "png"}
        ],
    }
    data.update(changes)
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": data}


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_charx(path: Path, card: dict[str, Any], assets: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("card.json", json.dumps(card))
        for name, data in assets.items():
            archive.writestr(name, data)
    return path


def test_charx_import_and_export(tmp_path: Path) -> None:
    icon = _png_bytes((200, 10, 10))
    assets = {"assets/icon/images/main.png": icon, "assets/other/x.bin": b"\0\1\2"}
    original = v3_card()
    path = write_charx(tmp_path / "aqua.charx", original, assets)
    persona, exported = stable_round_trip(path, tmp_path)
    assert exported == original
    assert (persona.folder / "avatar.png").read_bytes() == icon
    assert (persona.folder / "charx" / "assets" / "other" / "x.bin").read_bytes() == b"\0\1\2"
    assert persona.system_prompt() is not None and persona.system_prompt().startswith("Write Aq's next")
    out = tmp_path / "back.charx"
    export_card(persona, out)
    card = read_card(out)
    assert card.spec == "v3" and card.data == original["data"] and card.assets == assets
    # As a PNG: a V3 card carries both chunks, ccv3 (V3) and chara (V2).
    png = tmp_path / "back.png"
    export_card(persona, png)
    with Image.open(png) as image:
        image.load()
        chunks = dict(image.text)  # type: ignore[attr-defined]
    assert json.loads(base64.b64decode(chunks["ccv3"]))["spec"] == "chara_card_v3"
    assert json.loads(base64.b64decode(chunks["chara"]))["spec"] == "chara_card_v2"
    assert read_card(png).data == original["data"] and png.read_bytes().startswith(icon[:33])


def test_a_builtin_persona_exports_as_charx(tmp_path: Path) -> None:
    out = tmp_path / "pirate.charx"
    assert _cli("export-card", "pirate", "--out", str(out)) == 0
    card = read_card(out)
    assert card.spec == "v3" and card.name == "Captain Saltbeard"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"assets/x.png": b"1"}, "CharX zip has no card.json"),
        ({"card.json": b"{}", "../evil": b"x"}, "unsafe path in the zip: '../evil'"),
        ({"card.json": b"\xff\xfe"}, "(card.json): not UTF-8 text"),
    ],
)
def test_bad_charx_is_one_error(tmp_path: Path, members: dict[str, bytes], message: str) -> None:
    import zipfile

    path = tmp_path / "bad.charx"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    with pytest.raises(PersonaError) as info:
        import_card(path, tmp_path / "p")
    assert str(info.value).startswith(str(path)) and message in str(info.value)
    assert not (tmp_path / "p").exists()


def test_charx_zip_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from personas import card_files

    monkeypatch.setattr(card_files, "MAX_CHARX_BYTES", 1_000_000)
    path = write_charx(tmp_path / "bomb.charx", v3_card(), {"assets/zeros.bin": b"\0" * 2_000_000})
    with pytest.raises(PersonaError, match="the zip expands to 2"):
        read_card(path)


def test_a_lying_zip_header_is_refused(tmp_path: Path) -> None:
    """A member whose stored size understates what it inflates to is cut off, not read to the end."""
    path = write_charx(tmp_path / "lie.charx", v3_card(), {"assets/a.bin": b"\1" * 5000})
    raw = bytearray(path.read_bytes())
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.rfind(signature)
        raw[at + offset : at + offset + 4] = (10).to_bytes(4, "little")  # uncompressed size: 10
    path.write_bytes(bytes(raw))
    with pytest.raises(
        PersonaError, match=r"lie.charx: (assets/a.bin: larger than the zip says|unreadable zip)"
    ):
        read_card(path)


def test_a_sparse_card_exports_without_gaining_fields(tmp_path: Path) -> None:
    """Fields a card leaves out (or sets to null) stay that way: export adds nothing it did not have."""
    original = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Min", "personality": None}}
    persona, exported = stable_round_trip(write_json(tmp_path / "m.json", original), tmp_path)
    assert exported == original and persona.system_prompt() == "You are Min."


LOREBOOK_ONLY = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Cartographer",
        "character_book": {
            "entries": [
                {"keys": [], "content": "{{char}} maps the world.", "constant": True, "insertion_order": 0},
                {
                    "keys": ["map"],
                    "secondary_keys": ["old"],
                    "selective": True,
                    "content": "The old map is torn.",
                    "insertion_order": 1,
                    "position": "after_char",
                },
            ]
        },
    },
}


@pytest.mark.parametrize(
    "case",
    ["v1", "v2 with lorebook", "crlf", "non-ascii name", "v3 png with both chunks", "charx", "lorebook only"],
)
def test_every_case_is_stable_through_import_prompt_export_import(tmp_path: Path, case: str) -> None:
    v1 = {"name": "Old Timer", "description": "{{char}} remembers.", "first_mes": "Back in my day, <USER>."}
    crlf = {"spec": "chara_card_v2", "spec_version": "2.0", "data": CRLF_DATA}
    paths = {
        "v1": lambda: write_json(tmp_path / "c.json", v1),
        "v2 with lorebook": lambda: write_json(tmp_path / "c.json", v2_card()),
        "crlf": lambda: write_json(tmp_path / "c.json", crlf),
        "non-ascii name": lambda: write_json(tmp_path / "c.json", v2_card(name="初音ミク")),
        "v3 png with both chunks": lambda: write_png(
            tmp_path / "c.png", {"chara": v2_card(), "ccv3": v3_card()}
        ),
        "charx": lambda: write_charx(tmp_path / "c.charx", v3_card(), {"assets/icon/images/main.png": b"x"}),
        "lorebook only": lambda: write_json(tmp_path / "c.json", LOREBOOK_ONLY),
    }
    persona, exported = stable_round_trip(paths[case](), tmp_path)
    prompt = rendered_prompt(persona)
    if case in ("v2 with lorebook", "non-ascii name", "v3 png with both chunks", "charx"):
        assert "The guild is in Axel." in prompt  # the card's lorebook entry fired on "guild"
    if case == "lorebook only":
        assert "Cartographer maps the world.\n\nYou are Cartographer.\n\nThe old map is torn." in prompt
        assert exported == LOREBOOK_ONLY
