"""Character cards: importing SillyTavern / TavernAI cards as personas, and exporting personas as cards.

Reads Character Card V1 (flat fields), V2 (`{"spec": "chara_card_v2", "data": {...}}`) and V3
(`chara_card_v3`), as JSON or inside a PNG's text chunk `ccv3` or `chara` (base64 JSON; `ccv3` wins when
both are there). An imported card becomes a persona folder:

- `persona.toml`: the system prompt built from system_prompt, description, personality, scenario and
  post_history_instructions, the greeting from first_mes, `{{char}}` / `{{user}}` substituted;
- `dialogues.jsonl`: the `<START>` blocks of mes_example, one conversation per line, in the trainer's
  format `{"messages": [{"role": ..., "content": ...}, ...]}`;
- `card.json`: the whole card (unknown fields and `extensions` included) and what was derived from it,
  so `export_card` writes an equivalent V2 card back; edits made to the persona since are carried over.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import re
import shutil
import struct
import tempfile
import tomllib
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from bot.errors import PersonaError
from personas.registry import Persona, load_folder
from personas.spec import SLUG_PATTERN, display_path, validate_spec

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CARD_FILE = "card.json"
AVATAR_FILE = "avatar.png"
V2_SPEC = "chara_card_v2"
V3_SPEC = "chara_card_v3"
TEXT_FIELDS = (
    "name",
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
    image: bytes | None = None  # the PNG it came in

    @property
    def name(self) -> str:
        return str(self.data.get("name", ""))


# -- reading ----------------------------------------------------------------------------------------


def _png_text_chunks(raw: bytes, source: str) -> dict[str, str]:
    """The PNG's text chunks (tEXt, zTXt, iTXt) by keyword; the image data is never decoded."""
    chunks: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(raw):
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        kind = raw[pos + 4 : pos + 8]
        body = raw[pos + 8 : pos + 8 + length]
        if len(body) != length:
            raise PersonaError(f"{source}: truncated PNG (chunk {kind!r} runs past the end)")
        pos += 12 + length
        try:
            if kind == b"tEXt":
                key, _, text = body.partition(b"\0")
                chunks[key.decode("latin-1")] = text.decode("latin-1")
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\0")
                chunks[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _lang, _, rest = rest.partition(b"\0")
                _translated, _, text = rest.partition(b"\0")
                chunks[key.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode(
                    "utf-8"
                )
        except (zlib.error, UnicodeDecodeError, IndexError) as exc:
            raise PersonaError(f"{source}: unreadable PNG text chunk: {exc}") from None
        if kind == b"IEND":
            break
    return chunks


def _decode_chunk(text: str, key: str, source: str) -> Any:
    try:
        raw = base64.b64decode(text.strip(), validate=False)
        return json.loads(raw.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PersonaError(f"{source}: PNG chunk {key!r} is not base64-encoded JSON ({exc})") from None


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
    for key in TEXT_FIELDS:
        _text(card.data, key, source, prefix)
    for key in ("alternate_greetings", "tags"):
        value = card.data.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise PersonaError(f"{source}: {prefix}{key}: expected a list of strings")
    if card.data.get("extensions") is not None and not isinstance(card.data["extensions"], dict):
        raise PersonaError(f"{source}: {prefix}extensions: expected an object")
    if not card.name.strip():
        raise PersonaError(f"{source}: {prefix}name: missing or empty")
    for key, default in V2_DEFAULTS.items():
        if card.data.get(key) is None:
            card.data[key] = copy.deepcopy(default)
    return card


def read_card(path: Path) -> Card:
    """Read a card from a `.json` file or a `.png` with a `ccv3` / `chara` text chunk."""
    source = display_path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise PersonaError(f"{source}: not found") from None
    except OSError as exc:
        raise PersonaError(f"{source}: cannot read: {exc.strerror}") from None
    if raw.startswith(PNG_SIGNATURE):
        chunks = _png_text_chunks(raw, source)
        for key in ("ccv3", "chara"):
            if key in chunks:
                return parse_card(_decode_chunk(chunks[key], key, source), f"{source} ({key})", raw)
        raise PersonaError(f"{source}: PNG holds no character card (no 'chara' or 'ccv3' text chunk)")
    if path.suffix.lower() == ".png":
        raise PersonaError(f"{source}: not a PNG file")
    try:
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise PersonaError(f"{source}: not a character card: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise PersonaError(
            f"{source}: not a character card: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    return parse_card(obj, source)


# -- card -> persona ------------------------------------------------------------------------------------


def substitute(text: str, char: str, user: str) -> str:
    """Replace `{{char}}` / `{{user}}` (any case, and the old `<BOT>` / `<USER>`) with the names."""
    text = re.sub(r"\{\{\s*char\s*\}\}|<bot>", lambda _: char, text, flags=re.I)
    text = re.sub(r"\{\{\s*user\s*\}\}|<user>", lambda _: user, text, flags=re.I)
    return text


def build_system_prompt(data: dict[str, Any], user: str = DEFAULT_USER) -> str:
    """system_prompt, description, personality, scenario and post_history_instructions, in that order."""
    char = data["name"]
    system = re.sub(r"\{\{\s*original\s*\}\}", "", data.get("system_prompt") or "", flags=re.I)
    parts = [
        system.strip(),
        (data.get("description") or "").strip(),
        f"{{{{char}}}}'s personality: {data['personality'].strip()}"
        if data.get("personality", "").strip()
        else "",
        f"Scenario: {data['scenario'].strip()}" if data.get("scenario", "").strip() else "",
        (data.get("post_history_instructions") or "").strip(),
    ]
    text = "\n\n".join(p for p in parts if p) or "You are {{char}}."
    return substitute(text, char, user)


_SPEAKER_TEMPLATE = (
    r"^\s*(?P<who>\{{\{{\s*char\s*\}}\}}|\{{\{{\s*user\s*\}}\}}|<bot>|<user>{names})\s*:[ \t]?(?P<text>.*)$"
)


def parse_examples(mes_example: str, char: str, user: str = DEFAULT_USER) -> list[list[dict[str, str]]]:
    """The `<START>` blocks of a card's mes_example as conversations of {role, content} messages.

    A line `{{char}}: ...` (or `<BOT>:`, or the character's name) starts an assistant message, a line
    `{{user}}: ...` (or `<USER>:`, or the user's name) a user message; other lines continue the message
    before them. Consecutive lines of one speaker are one message. Blocks without an assistant line are
    skipped: there is nothing in them to train on.
    """
    names = "".join(f"|{re.escape(n)}" for n in (char, user) if n)
    speaker = re.compile(_SPEAKER_TEMPLATE.format(names=names), re.I)
    conversations = []
    for block in re.split(r"<start>", mes_example, flags=re.I):
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
        for m in messages:
            m["content"] = substitute(m["content"].strip(), char, user)
        messages = [m for m in messages if m["content"]]
        if any(m["role"] == "assistant" for m in messages):
            conversations.append(messages)
    return conversations


def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64].strip("-")
    return slug


def _tagline(data: dict[str, Any], user: str) -> str:
    for text in (data.get("creator_notes", ""), data.get("description", ""), data.get("personality", "")):
        for line in substitute(text, data["name"], user).splitlines():
            if line.strip():
                line = line.strip()
                return line if len(line) <= 200 else line[:199].rstrip() + "…"
    return ""


def _dialogues_text(conversations: list[list[dict[str, str]]]) -> str:
    return "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in conversations)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


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
)


def card_to_persona_files(card: Card, slug: str, user: str = DEFAULT_USER) -> dict[str, bytes]:
    """The files of the persona folder a card becomes, by name."""
    data = card.data
    char = data["name"]
    system_prompt = build_system_prompt(data, user)
    greeting = substitute(data.get("first_mes", ""), char, user).strip()
    conversations = parse_examples(data.get("mes_example", ""), char, user)
    dialogues = _dialogues_text(conversations)
    toml: dict[str, Any] = {
        "slug": slug,
        "name": char,
        "description": _tagline(data, user),
        "system_prompt": system_prompt,
        "greeting": greeting,
        "template": "model",
        "dialogues": ["dialogues.jsonl"] if conversations else [],
    }
    carried = (data.get("extensions") or {}).get("personabot")
    if isinstance(carried, dict):
        toml.update({k: v for k, v in carried.items() if k in _CARRIED and v is not None})
    header = (
        f"# Imported from a character card ({card.spec}) on {datetime.now(UTC):%Y-%m-%d}; see card.json.\n"
    )
    files = {"persona.toml": (header + tomli_w.dumps(toml, multiline_strings=True)).encode("utf-8")}
    if conversations:
        files["dialogues.jsonl"] = dialogues.encode("utf-8")
    files[CARD_FILE] = (
        json.dumps(
            {
                "format": 1,
                "source_spec": card.spec,
                "spec_version": card.spec_version,
                "user_name": user,
                "top_level": card.top_level,
                "data": card.data,
                # What the persona was built from the card; export compares to spot later edits.
                "derived": {
                    "name": char,
                    "system_prompt": system_prompt,
                    "greeting": greeting,
                    "dialogues_sha256": _sha256_text(dialogues),
                },
            },
            ensure_ascii=False,
            indent=2,
        )
        + "\n"
    ).encode("utf-8")
    if card.image is not None:
        files[AVATAR_FILE] = card.image
    return files


def import_card(
    path: Path, dest_root: Path, *, slug: str | None = None, user: str = DEFAULT_USER, force: bool = False
) -> Persona:
    """Write the persona folder `<dest_root>/<slug>` for the card at `path`; returns the loaded persona.

    Nothing is written unless the card reads and the persona validates; the folder appears at once.
    """
    card = read_card(path)
    carried = (card.data.get("extensions") or {}).get("personabot")
    if not slug and isinstance(carried, dict) and isinstance(carried.get("slug"), str):
        slug = carried["slug"]
    slug = slug or slugify(card.name)
    if not slug:
        raise PersonaError(
            f"{display_path(path)}: cannot make a slug from the name {card.name!r}; pass --slug"
        )
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


def persona_to_card(persona: Persona, *, max_examples: int = DEFAULT_EXPORT_EXAMPLES) -> dict[str, Any]:
    """A V2 card for the persona: its imported card with later edits applied, or one built from the spec."""
    spec = persona.spec
    stored_path = persona.folder / CARD_FILE
    conversations = _read_dialogues(persona)
    if stored_path.is_file():
        try:
            stored = json.loads(stored_path.read_text(encoding="utf-8"))
            data = copy.deepcopy(stored["data"])
            derived = stored["derived"]
            top = dict(stored.get("top_level") or {})
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise PersonaError(f"{display_path(stored_path)}: corrupt ({exc})") from None
        if spec.name != derived.get("name"):
            data["name"] = spec.name
        if spec.system_prompt != derived.get("system_prompt"):
            # Edited since import: the persona's prompt becomes the card's whole definition.
            data.update(description=spec.system_prompt, personality="", scenario="")
            data.update(system_prompt="", post_history_instructions="")
        if spec.greeting != derived.get("greeting"):
            data["first_mes"] = spec.greeting
        if _sha256_text(_dialogues_text(conversations)) != derived.get("dialogues_sha256"):
            data["mes_example"] = format_examples(conversations)
        # Some tools repeat the V1 fields at the top level; keep those copies in step.
        for key in V1_FIELDS:
            if key in top:
                top[key] = data.get(key, "")
    else:
        top = {}
        data = copy.deepcopy(V2_DEFAULTS)
        data.update(
            name=spec.name,
            description=spec.system_prompt,
            first_mes=spec.greeting,
            mes_example=format_examples(conversations[:max_examples]),
            creator_notes=spec.description,
            extensions={
                "personabot": {
                    "slug": spec.slug,
                    **spec.model_dump(mode="json", include=set(_CARRIED), exclude_none=True),
                }
            },
        )
    return {**top, "spec": V2_SPEC, "spec_version": "2.0", "data": data}


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return (
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    )


def embed_in_png(image: bytes, card: dict[str, Any]) -> bytes:
    """`image` with its card chunks replaced by a `chara` tEXt chunk holding `card` (base64 JSON)."""
    payload = base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8"))
    out = [PNG_SIGNATURE]
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(image):
        (length,) = struct.unpack(">I", image[pos : pos + 4])
        kind = image[pos + 4 : pos + 8]
        chunk = image[pos : pos + 12 + length]
        pos += 12 + length
        if kind in (b"tEXt", b"iTXt", b"zTXt") and chunk[8:].split(b"\0", 1)[0] in (b"chara", b"ccv3"):
            continue
        if kind == b"IEND":
            out.append(_png_chunk(b"tEXt", b"chara\0" + payload))
        out.append(chunk)
        if kind == b"IEND":
            break
    return b"".join(out)


def _blank_avatar() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (400, 600), (40, 44, 52)).save(buffer, format="PNG")
    return buffer.getvalue()


def export_card(
    persona: Persona, out: Path, *, max_examples: int = DEFAULT_EXPORT_EXAMPLES
) -> dict[str, Any]:
    """Write the persona as a V2 card to `out` (`.png`: inside the persona's avatar image); returns it."""
    card = persona_to_card(persona, max_examples=max_examples)
    if out.suffix.lower() == ".png":
        avatar = persona.folder / AVATAR_FILE
        image = avatar.read_bytes() if avatar.is_file() else _blank_avatar()
        out.write_bytes(embed_in_png(image, card))
    else:
        out.write_text(json.dumps(card, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return card
