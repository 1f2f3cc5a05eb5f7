"""Character cards: importing SillyTavern / TavernAI cards as personas, and exporting personas as cards.

Reads Character Card V1 (flat fields), V2 (`{"spec": "chara_card_v2", "data": {...}}`) and V3
(`chara_card_v3`), as JSON, inside a PNG's text chunk `ccv3` or `chara` (base64 JSON; `ccv3` wins when
both are there), or as a CharX zip (`card.json` plus assets). An imported card becomes a persona folder:

- `persona.toml`: the card's definition fields in a `[character]` table (system_prompt, description,
  personality, scenario, post_history_instructions), the greetings, the nickname; macros such as
  `{{char}}` stay as written and are expanded when the persona is used (`personas.macros`);
- `dialogues.jsonl`: the `<START>` blocks of mes_example, one conversation per line, macros expanded;
- `lorebook.json`: the card's `character_book`, used in prompts (`lorebooks = ["lorebook.json"]`);
- `card.json`: the whole card as read (unknown fields and `extensions` included), so `export_card`
  gives the same card back field by field, line endings included, changing only the fields edited since;
- `avatar.png` (a PNG card's image) and `charx/` (a CharX zip's assets, under their paths in the zip).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w
from anyascii import anyascii

from bot.errors import PersonaError
from personas.card_files import (
    CARD_CHUNKS,
    PNG_SIGNATURE,
    ZIP_SIGNATURE,
    blank_avatar,
    charx_bytes,
    decode_chunk,
    embed_in_png,
    load_json,
    png_text_chunks,
    read_charx,
    read_limited,
)
from personas.macros import MacroContext, expand
from personas.registry import Persona, load_folder
from personas.spec import SLUG_PATTERN, display_path, validate_spec

CARD_FILE = "card.json"
AVATAR_FILE = "avatar.png"
LOREBOOK_FILE = "lorebook.json"
CHARX_DIR = "charx"
CARD_FORMAT = 2
V2_SPEC = "chara_card_v2"
V3_SPEC = "chara_card_v3"
TEXT_FIELDS = (
    "name",
    "nickname",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "creator",
    "character_version",
)
# The card fields a persona's [character] table holds, under the same names.
CHARACTER_FIELDS = ("system_prompt", "description", "personality", "scenario", "post_history_instructions")
# Fields a V2 card always has, and their empty values (character_book is optional).
V2_DEFAULTS: dict[str, Any] = {
    "name": "",
    "description": "",
    "personality": "",
    "scenario": "",
    "first_mes": "",
    "mes_example": "",
    "creator_notes": "",
    "system_prompt": "",
    "post_history_instructions": "",
    "alternate_greetings": [],
    "tags": [],
    "creator": "",
    "character_version": "",
    "extensions": {},
}
# Pygmalion / early TavernAI names for the V1 fields.
V1_ALIASES = {
    "char_name": "name",
    "char_persona": "personality",
    "world_scenario": "scenario",
    "char_greeting": "first_mes",
    "example_dialogue": "mes_example",
}
V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
DEFAULT_USER = "User"
DEFAULT_EXPORT_EXAMPLES = 5


@dataclass
class Card:
    """A card read from a file, its data in V2 field names."""

    spec: str  # "v1", "v2" or "v3"
    data: dict[str, Any]
    top_level: dict[str, Any] = field(default_factory=dict)  # wrapper keys besides spec/spec_version/data
    spec_version: str = "2.0"
    image: bytes | None = None  # the PNG it came in, or the CharX's main icon when a PNG
    assets: dict[str, bytes] = field(default_factory=dict)  # a CharX's other files, by path in the zip
    container: str = "json"  # "json", "png" or "charx"
    original: dict[str, Any] = field(default_factory=dict)  # `data` exactly as read, for faithful export

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))


# -- reading ----------------------------------------------------------------------------------------


def _text(data: dict[str, Any], key: str, source: str, prefix: str) -> None:
    """Check one text field in place: null becomes "", anything else but a string is an error."""
    value = data.get(key)
    if value is None:
        if key in data:
            data[key] = ""
        return
    if not isinstance(value, str):
        raise PersonaError(f"{source}: {prefix}{key}: expected a string, got {type(value).__name__}")


def parse_card(obj: Any, source: str, image: bytes | None = None) -> Card:
    """A card from its decoded JSON; a `PersonaError` naming `source` and the field when it is not one."""
    if not isinstance(obj, dict):
        raise PersonaError(f"{source}: not a character card (expected a JSON object)")
    spec = obj.get("spec")
    if spec in (V2_SPEC, V3_SPEC):
        data = obj.get("data")
        if not isinstance(data, dict):
            raise PersonaError(f"{source}: data: expected an object in a {spec} card")
        top = {k: v for k, v in obj.items() if k not in ("spec", "spec_version", "data")}
        card = Card(
            "v2" if spec == V2_SPEC else "v3",
            copy.deepcopy(data),
            copy.deepcopy(top),
            str(obj.get("spec_version") or ("2.0" if spec == V2_SPEC else "3.0")),
            image,
        )
        prefix = "data."
    elif spec is not None:
        raise PersonaError(f"{source}: spec: unknown card spec {spec!r} (expected {V2_SPEC} or {V3_SPEC})")
    else:
        data = copy.deepcopy(obj)
        for old, new in V1_ALIASES.items():
            if old in data and new not in data:
                data[new] = data.pop(old)
        card = Card("v1", data, {}, "2.0", image)
        prefix = ""
    card.original = copy.deepcopy(card.data)
    for key in TEXT_FIELDS:
        _text(card.data, key, source, prefix)
    for key in ("alternate_greetings", "tags"):
        value = card.data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise PersonaError(f"{source}: {prefix}{key}: expected a list of strings")
    if card.data.get("extensions") is not None and not isinstance(card.data["extensions"], dict):
        raise PersonaError(f"{source}: {prefix}extensions: expected an object")
    book = card.data.get("character_book")
    if book is not None and not isinstance(book, dict):
        raise PersonaError(f"{source}: {prefix}character_book: expected an object")
    if not card.name.strip():
        raise PersonaError(f"{source}: {prefix}name: missing or empty")
    for key, default in V2_DEFAULTS.items():
        if card.data.get(key) is None:
            card.data[key] = copy.deepcopy(default)
    return card


def _charx_icon(card: Card) -> bytes | None:
    """The CharX's main icon when it is a PNG (it becomes the persona's avatar)."""
    for asset in card.data.get("assets") or []:
        if isinstance(asset, dict) and asset.get("type") == "icon":
            uri = str(asset.get("uri", ""))
            for scheme in ("embeded://", "embedded://"):
                if uri.startswith(scheme):
                    data = card.assets.get(uri[len(scheme) :])
                    if data is not None and data.startswith(PNG_SIGNATURE):
                        return data
    return None


def read_card(path: Path) -> Card:
    """Read a card from a `.json` file, a `.png` with a `ccv3` / `chara` text chunk, or a `.charx` zip."""
    source = display_path(path)
    raw = read_limited(path, source)
    if raw.startswith(PNG_SIGNATURE):
        chunks = png_text_chunks(raw, source)
        for key in CARD_CHUNKS:
            if key in chunks:
                card = parse_card(decode_chunk(chunks[key], key, source), f"{source} ({key})", raw)
                card.container = "png"
                return card
        raise PersonaError(f"{source}: PNG holds no character card (no 'chara' or 'ccv3' text chunk)")
    if path.suffix.lower() == ".png":
        raise PersonaError(f"{source}: not a PNG file")
    if raw.startswith(ZIP_SIGNATURE) or path.suffix.lower() == ".charx":
        obj, assets = read_charx(raw, source)
        card = parse_card(obj, f"{source} (card.json)")
        card.assets, card.container = assets, "charx"
        card.image = _charx_icon(card)
        return card
    return parse_card(load_json(raw, f"{source}: not a character card:"), source)


# -- card -> persona ------------------------------------------------------------------------------------


def _lf(text: str) -> str:
    """Line endings as the persona keeps them (the card's own are restored on export)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


_SPEAKER_TEMPLATE = (
    r"^\s*(?P<who>\{{\{{\s*char\s*\}}\}}|\{{\{{\s*user\s*\}}\}}|<bot>|<user>{names})\s*:[ \t]?(?P<text>.*)$"
)


def parse_examples(
    mes_example: str, char: str, user: str = DEFAULT_USER, ctx: MacroContext | None = None
) -> list[list[dict[str, str]]]:
    """The `<START>` blocks of a card's mes_example as conversations of {role, content} messages.

    A line `{{char}}: ...` (or `<BOT>:`, or the character's name) starts an assistant message, a line
    `{{user}}: ...` (or `<USER>:`, or the user's name) a user message; other lines continue the message
    before them. Consecutive lines of one speaker are one message. Blocks without an assistant line are
    skipped: there is nothing in them to train on. Macros in the messages are expanded with `ctx`.
    """
    ctx = ctx or MacroContext(char, user, char)
    names = "".join(f"|{re.escape(n)}" for n in (char, user) if n)
    speaker = re.compile(_SPEAKER_TEMPLATE.format(names=names), re.I)
    conversations: list[list[dict[str, str]]] = []
    for block in re.split(r"<start>", _lf(mes_example), flags=re.I):
        messages: list[dict[str, str]] = []
        for line in block.splitlines():
            match = speaker.match(line)
            if match is None:
                if messages:
                    messages[-1]["content"] += "\n" + line
                continue
            who = re.sub(r"\s+", "", match["who"].lower())
            role = "assistant" if who in ("{{char}}", "<bot>", char.lower()) else "user"
            text = match["text"]
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + text
            else:
                messages.append({"role": role, "content": text})
        for number, m in enumerate(messages):
            m["content"] = expand(m["content"].strip(), ctx, f"mes_example.{len(conversations)}.{number}")
        messages = [m for m in messages if m["content"]]
        if any(m["role"] == "assistant" for m in messages):
            conversations.append(messages)
    return conversations


def slugify(name: str) -> str:
    """A slug for any name: transliterated to ASCII where possible, else `card-` and a short stable hash."""
    ascii_name = anyascii(name)
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:64].strip("-")
    return slug or "card-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


def _tagline(data: dict[str, Any], ctx: MacroContext) -> str:
    for key in ("creator_notes", "description", "personality"):
        for line in expand(_lf(data.get(key, "")), ctx, key).splitlines():
            if line.strip():
                line = line.strip()
                return line if len(line) <= 200 else line[:199].rstrip() + "…"
    return ""


def _dialogues_text(conversations: list[list[dict[str, str]]]) -> str:
    return "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations)


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Settings a personabot-exported card carries in extensions["personabot"], restored on import.
_CARRIED = (
    "template",
    "context_window",
    "sampling",
    "triggers",
    "schedule",
    "lora",
    "training",
    "style_check",
    "greeting_choice",
    "user_name",
    "lore",
)


def card_to_persona_files(card: Card, slug: str, user: str | None = None) -> dict[str, bytes]:
    """The files of the persona folder a card becomes, by name (CharX assets under `charx/`)."""
    data = card.data
    carried = (data.get("extensions") or {}).get("personabot")
    carried = (
        {k: v for k, v in carried.items() if k in _CARRIED and v is not None}
        if isinstance(carried, dict)
        else {}
    )
    user = user or str(carried.get("user_name") or DEFAULT_USER)
    name, nickname = data["name"], data.get("nickname") or ""
    ctx = MacroContext(nickname or name, user, slug)
    conversations = parse_examples(data.get("mes_example", ""), nickname or name, user, ctx)
    dialogues = _dialogues_text(conversations).encode("utf-8")
    toml: dict[str, Any] = {
        "slug": slug,
        "name": name,
        "description": _tagline(data, ctx),
        "user_name": user,
        "greeting": _lf(data.get("first_mes", "")),
        "template": "model",
        "dialogues": ["dialogues.jsonl"] if conversations else [],
    }
    if nickname:
        toml["nickname"] = nickname
    if data.get("alternate_greetings"):
        toml["alternate_greetings"] = [_lf(g) for g in data["alternate_greetings"]]
    toml.update(carried)
    toml["user_name"] = user
    book = data.get("character_book")
    lorebook = None
    if isinstance(book, dict) and book.get("entries"):
        toml["lorebooks"] = [LOREBOOK_FILE]
        lorebook = (json.dumps(book, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    toml["character"] = {k: _lf(data.get(k) or "") for k in CHARACTER_FIELDS}
    header = (
        f"# Imported from a character card ({card.spec}) on {datetime.now(UTC):%Y-%m-%d}; see card.json.\n"
        "# [character] holds the card's definition; {{char}}, {{user}} and other macros stay as written.\n"
    )
    files = {"persona.toml": (header + tomli_w.dumps(toml, multiline_strings=True)).encode("utf-8")}
    if conversations:
        files["dialogues.jsonl"] = dialogues
    if lorebook is not None:
        files[LOREBOOK_FILE] = lorebook
    record = {
        "format": CARD_FORMAT,
        "source_spec": card.spec,
        "spec_version": card.spec_version,
        "container": card.container,
        "top_level": card.top_level,
        # V1 cards are exported as V2, so they get the V2 fields they lack; others are kept as read.
        "data": card.data if card.spec == "v1" else card.original,
        # What the persona's files were made from the card; export compares to spot later edits.
        "dialogues_sha256": _sha256_bytes(dialogues),
        "lorebook_sha256": _sha256_bytes(lorebook) if lorebook is not None else None,
    }
    files[CARD_FILE] = (json.dumps(record, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    if card.image is not None:
        files[AVATAR_FILE] = card.image
    for rel, content in card.assets.items():
        files[f"{CHARX_DIR}/{rel}"] = content
    return files


def card_slug(card: Card) -> str:
    """The slug a card imports as: the one a personabot export carries, else one made from the name."""
    carried = (card.data.get("extensions") or {}).get("personabot")
    if isinstance(carried, dict) and isinstance(carried.get("slug"), str) and carried["slug"]:
        return str(carried["slug"])
    return slugify(card.name)


def import_card(
    path: Path, dest_root: Path, *, slug: str | None = None, user: str | None = None, force: bool = False
) -> Persona:
    """Write the persona folder `<dest_root>/<slug>` for the card at `path`; returns the loaded persona.

    Nothing is written unless the card reads and the persona validates; the folder appears at once.
    """
    card = read_card(path)
    slug = slug or card_slug(card)
    if not re.match(SLUG_PATTERN, slug):
        raise PersonaError(f"--slug {slug!r}: use 1-64 lowercase letters, digits, '-' or '_'")
    target = dest_root / slug
    if target.exists() and not force:
        raise PersonaError(f"{display_path(target)} already exists; pass --force to replace it")
    files = card_to_persona_files(card, slug, user)
    # Check the persona (settings carried in extensions included) against the card, before writing.
    validate_spec(tomllib.loads(files["persona.toml"].decode("utf-8")), f"{display_path(path)} as persona")
    dest_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest_root, prefix=f".import-{slug}-"))
    try:
        for name, content in files.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(content)
        load_folder(staging, "card")  # validates before anything becomes visible
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_folder(target, f"user:{display_path(dest_root)}")


# -- persona -> card ------------------------------------------------------------------------------------


def _read_dialogues(persona: Persona) -> list[list[dict[str, str]]]:
    conversations = []
    for path in persona.dialogue_paths():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PersonaError(f"{display_path(path)}:{number}: not a dialogue line ({exc})") from None
            conversations.append(
                [m for m in messages if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
            )
    return conversations


def format_examples(conversations: list[list[dict[str, str]]]) -> str:
    """Conversations as a card's mes_example: `<START>` blocks of `{{user}}:` / `{{char}}:` lines."""
    blocks = []
    for messages in conversations:
        lines = ["<START>"]
        for m in messages:
            who = "{{char}}" if m["role"] == "assistant" else "{{user}}"
            lines.append(f"{who}: {m['content']}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _persona_fields(persona: Persona) -> dict[str, Any]:
    """The card fields as the persona has them now (macros as written, line endings LF)."""
    spec = persona.spec
    fields: dict[str, Any] = {
        "name": spec.name,
        "nickname": spec.nickname,
        "first_mes": spec.greeting,
        "alternate_greetings": list(spec.alternate_greetings),
    }
    if spec.character is not None:
        fields.update({k: getattr(spec.character, k) for k in CHARACTER_FIELDS})
    else:  # a hand-written persona: its whole prompt is the card's description
        fields.update(dict.fromkeys(CHARACTER_FIELDS, ""), description=spec.system_prompt)
    return fields


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, list):
        return isinstance(theirs, list) and len(ours) == len(theirs) and all(map(_same, ours, theirs))
    return isinstance(theirs, str) and _lf(ours) == _lf(theirs)


def _styled(ours: Any, theirs: Any) -> Any:
    """An edited value in the original's line-ending style (CRLF cards stay CRLF)."""
    if isinstance(ours, list):
        crlf = isinstance(theirs, list) and any(isinstance(t, str) and "\r\n" in t for t in theirs)
        return [o.replace("\n", "\r\n") if crlf else o for o in ours]
    return ours.replace("\n", "\r\n") if isinstance(theirs, str) and "\r\n" in theirs else ours


def _read_lorebook_json(persona: Persona) -> tuple[bytes, Any] | None:
    if not persona.spec.lorebooks:
        return None
    path = persona.folder / persona.spec.lorebooks[0]
    raw = read_limited(path, display_path(path))
    return raw, load_json(raw, f"{display_path(path)}:")


def _as_character_book(obj: Any) -> Any:
    """A World Info file (entries keyed by uid) as a V2 character_book; a character_book as it is."""
    if not isinstance(obj, dict) or not isinstance(obj.get("entries"), dict):
        return obj
    entries = []
    for uid, e in obj["entries"].items():
        entries.append(
            {
                "id": e.get("uid", uid),
                "keys": e.get("key") or [],
                "secondary_keys": e.get("keysecondary") or [],
                "comment": e.get("comment") or "",
                "content": e.get("content") or "",
                "constant": bool(e.get("constant")),
                "selective": bool(e.get("selective")),
                "insertion_order": e.get("order", 100),
                "enabled": not e.get("disable", False),
                "position": "after_char" if e.get("position") == 1 else "before_char",
                "extensions": {
                    k: e[k] for k in ("selectiveLogic", "position", "scanDepth", "caseSensitive") if k in e
                },
            }
        )
    return {"name": obj.get("name", ""), "entries": entries, "extensions": {}}


def _stored(persona: Persona) -> dict[str, Any] | None:
    path = persona.folder / CARD_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(stored["data"], dict):
            raise TypeError("data is not an object")
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PersonaError(f"{display_path(path)}: corrupt ({exc})") from None
    return dict(stored)


def _legacy_unedited(stored: dict[str, Any], persona: Persona, fields: dict[str, Any]) -> dict[str, Any]:
    """Format 1 imports kept one flattened prompt and compared it to what was derived: unchanged parts
    are left out of `fields`, so the card's own fields stay."""
    derived = stored.get("derived")
    if stored.get("format") != 1 or not isinstance(derived, dict) or persona.spec.character is not None:
        return fields
    spec = persona.spec
    fields = {k: v for k, v in fields.items() if k not in ("nickname", "alternate_greetings") or v}
    if spec.system_prompt == derived.get("system_prompt"):
        fields = {k: v for k, v in fields.items() if k not in CHARACTER_FIELDS}
    if spec.greeting == derived.get("greeting"):
        fields.pop("first_mes", None)
    return fields


def persona_to_card(persona: Persona, *, max_examples: int = DEFAULT_EXPORT_EXAMPLES) -> dict[str, Any]:
    """The persona as a card: its imported card with only the fields edited since changed (same spec as
    imported; V1 becomes V2), or a V2 card built from the spec."""
    spec = persona.spec
    stored = _stored(persona)
    conversations = _read_dialogues(persona)
    if stored is not None:
        data = copy.deepcopy(stored["data"])
        top = copy.deepcopy(dict(stored.get("top_level") or {}))
        for key, ours in _legacy_unedited(stored, persona, _persona_fields(persona)).items():
            theirs = data.get(key)
            if theirs is None and not ours:
                continue  # a field the card never had, still empty
            if not _same(ours, theirs):
                data[key] = _styled(ours, theirs)
        dialogues = _dialogues_text(conversations).encode("utf-8")
        derived = stored.get("derived") or {}
        if _sha256_bytes(dialogues) != stored.get("dialogues_sha256", derived.get("dialogues_sha256")):
            data["mes_example"] = _styled(format_examples(conversations), data.get("mes_example"))
        book = _read_lorebook_json(persona)
        if book is None and stored.get("lorebook_sha256"):
            data.pop("character_book", None)  # the lorebook was detached from the persona
        elif book is not None and _sha256_bytes(book[0]) != stored.get("lorebook_sha256"):
            data["character_book"] = _as_character_book(book[1])
        # Some tools repeat the V1 fields at the top level; keep those copies in step.
        for key in V1_FIELDS:
            if key in top:
                top[key] = data.get(key, "")
        if stored.get("source_spec") == "v3":
            return {**top, "spec": V3_SPEC, "spec_version": stored.get("spec_version") or "3.0", "data": data}
        return {**top, "spec": V2_SPEC, "spec_version": "2.0", "data": data}
    data = copy.deepcopy(V2_DEFAULTS)
    data.update({k: v for k, v in _persona_fields(persona).items() if v or k in data})
    data.update(
        mes_example=format_examples(conversations[:max_examples]),
        creator_notes=spec.description,
        extensions={
            "personabot": {
                "slug": spec.slug,
                **spec.model_dump(mode="json", include=set(_CARRIED), exclude_none=True),
            }
        },
    )
    book = _read_lorebook_json(persona)
    if book is not None:
        data["character_book"] = _as_character_book(book[1])
    return {"spec": V2_SPEC, "spec_version": "2.0", "data": data}


def _charx_assets(persona: Persona, card: dict[str, Any]) -> dict[str, bytes]:
    """The CharX files: the imported ones under `charx/`, else the avatar as the main icon."""
    root = persona.folder / CHARX_DIR
    if root.is_dir():
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }
    avatar = persona.folder / AVATAR_FILE
    if not avatar.is_file():
        return {}
    icon = "assets/icon/images/main.png"
    assets = card["data"].setdefault("assets", [])
    if not any(isinstance(a, dict) and a.get("type") == "icon" for a in assets):
        assets.append({"type": "icon", "uri": f"embeded://{icon}", "name": "main", "ext": "png"})
    return {icon: avatar.read_bytes()}


def _as_v3(card: dict[str, Any]) -> dict[str, Any]:
    if card["spec"] == V3_SPEC:
        return card
    data = copy.deepcopy(card["data"])
    data.setdefault("group_only_greetings", [])
    return {"spec": V3_SPEC, "spec_version": "3.0", "data": data}


def export_card(
    persona: Persona, out: Path, *, max_examples: int = DEFAULT_EXPORT_EXAMPLES
) -> dict[str, Any]:
    """Write the persona as a card to `out`: `.json`, `.png` (in the persona's avatar image; a V3 card
    gets both a `ccv3` and a V2 `chara` chunk) or `.charx` (V3 zip with its assets); returns the card."""
    card = persona_to_card(persona, max_examples=max_examples)
    suffix = out.suffix.lower()
    if suffix == ".png":
        avatar = persona.folder / AVATAR_FILE
        image = avatar.read_bytes() if avatar.is_file() else blank_avatar()
        chunks = {"chara": card}
        if card["spec"] == V3_SPEC:
            chunks = {"chara": {**card, "spec": V2_SPEC, "spec_version": "2.0"}, "ccv3": card}
        out.write_bytes(embed_in_png(image, chunks))
    elif suffix == ".charx":
        card = _as_v3(card)
        assets = _charx_assets(persona, card)
        out.write_bytes(charx_bytes(card, assets))
    else:
        out.write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return card
