"""Reading lorebooks: a card's `character_book` (V2/V3) or a SillyTavern World Info JSON file.

Both become `bot.prompting.lorebook.LoreEntry`s. The two shapes:

- `character_book`: `{"entries": [{"keys", "content", "enabled", "insertion_order", "case_sensitive",
  "selective", "secondary_keys", "constant", "position", "priority", "name", "comment", "extensions"}]}`
  (V3 adds `use_regex`: the keys are regular expressions),
  with SillyTavern's extras (`selectiveLogic`, `scan_depth`, numeric `position`) in `extensions`;
- World Info: `{"entries": {"0": {"key", "keysecondary", "content", "disable", "order", "constant",
  "selective", "selectiveLogic", "position", "caseSensitive", "scanDepth", "comment"}}}`.

SillyTavern's numeric positions: 0 is before the character definition, 1 after it; the others (author's
note, at a depth in the chat) are put after it too. Errors name the file and the entry's field.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot.errors import PersonaError
from bot.prompting.lorebook import (
    DEFAULT_SCAN_DEPTH,
    DEFAULT_TOKEN_BUDGET,
    Lorebook,
    LoreEntry,
    Position,
    SelectiveLogic,
)
from personas.card_files import load_json, read_limited
from personas.spec import LoreSettings, display_path

SELECTIVE_LOGIC: dict[int, SelectiveLogic] = {0: "and_any", 1: "not_all", 2: "not_any", 3: "and_all"}
POSITIONS: dict[str | int, Position] = {
    "before_char": "before_char",
    "after_char": "after_char",
    0: "before_char",
}


class _Fields:
    """Typed reads of one entry's fields, each error naming the source and the field."""

    def __init__(self, obj: dict[str, Any], where: str) -> None:
        self.obj, self.where = obj, where

    def get(self, *names: str, kind: type | tuple[type, ...], default: Any) -> Any:
        for name in names:
            value = self.obj.get(name)
            if value is None:
                continue
            if isinstance(value, bool) and kind in (int, (int, float)):
                raise PersonaError(f"{self.where}.{name}: expected a number, got a boolean")
            if not isinstance(value, kind):
                expected = getattr(kind, "__name__", "a number")
                raise PersonaError(f"{self.where}.{name}: expected {expected}, got {type(value).__name__}")
            return value
        return default

    def keys(self, *names: str) -> tuple[str, ...]:
        for name in names:
            value = self.obj.get(name)
            if value is None:
                continue
            if isinstance(value, str):  # some tools write one comma-separated string
                return tuple(k.strip() for k in value.split(",") if k.strip())
            if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
                raise PersonaError(f"{self.where}.{name}: expected a list of strings")
            return tuple(value)
        return ()


def _entry(obj: Any, where: str, scan_depth: int, expand: Callable[[str], str]) -> LoreEntry:
    if not isinstance(obj, dict):
        raise PersonaError(f"{where}: expected an object")
    f = _Fields(obj, where)
    ext = obj.get("extensions")
    x = _Fields(ext if isinstance(ext, dict) else {}, f"{where}.extensions")
    logic = x.get("selectiveLogic", kind=int, default=None)
    logic = f.get("selectiveLogic", kind=int, default=logic if logic is not None else 0)
    if logic not in SELECTIVE_LOGIC:
        raise PersonaError(f"{where}.selectiveLogic: expected 0, 1, 2 or 3, got {logic!r}")
    position: Any = f.get("position", kind=(str, int), default=None)
    if position is None or position == "":
        position = x.get("position", kind=int, default=0)
    if isinstance(position, str) and position not in POSITIONS:
        raise PersonaError(f"{where}.position: expected 'before_char' or 'after_char', got {position!r}")
    depth = f.get("scanDepth", kind=int, default=None)
    depth = x.get("scan_depth", kind=int, default=depth)
    order = f.get("insertion_order", "order", kind=(int, float), default=100)
    priority = f.get("priority", kind=(int, float), default=None)
    case = f.get("case_sensitive", "caseSensitive", kind=bool, default=None)
    case = x.get("case_sensitive", kind=bool, default=case)
    enabled = f.get("enabled", kind=bool, default=True) and not f.get("disable", kind=bool, default=False)
    content = f.get("content", kind=str, default="")
    keys, secondary = f.keys("keys", "key"), f.keys("secondary_keys", "keysecondary")
    if f.get("use_regex", kind=bool, default=False):  # V3: every key is a regex
        flags = "" if case else "i"
        keys, secondary = (tuple(f"/{k}/{flags}" for k in ks) for ks in (keys, secondary))
    return LoreEntry(
        content=expand(content),
        keys=keys,
        secondary_keys=secondary,
        selective=f.get("selective", kind=bool, default=False),
        selective_logic=SELECTIVE_LOGIC[logic],
        constant=f.get("constant", kind=bool, default=False),
        enabled=enabled,
        case_sensitive=bool(case),
        insertion_order=int(order),
        priority=int(priority) if priority is not None else None,
        position=POSITIONS.get(position, "after_char"),
        scan_depth=depth if depth is not None else scan_depth,
        name=str(f.get("name", kind=str, default="") or f.get("comment", kind=str, default="")),
        source=where,
    )


def parse_lorebook(
    obj: Any, source: str, settings: LoreSettings | None = None, expand: Callable[[str], str] = str
) -> Lorebook:
    """A lorebook from a decoded `character_book` or World Info object; `expand` expands its macros."""
    settings = settings or LoreSettings()
    if not isinstance(obj, dict):
        raise PersonaError(f"{source}: not a lorebook (expected a JSON object)")
    entries = obj.get("entries")
    if isinstance(entries, dict):  # World Info: entries keyed by uid
        items = sorted(
            entries.items(),
            key=lambda kv: (kv[1].get("displayIndex", 0), kv[0]) if isinstance(kv[1], dict) else (0, kv[0]),
        )
        listed = [(f"{source}: entries.{k}", v) for k, v in items]
    elif isinstance(entries, list):
        listed = [(f"{source}: entries.{i}", v) for i, v in enumerate(entries)]
    else:
        raise PersonaError(f"{source}: entries: expected a list (character_book) or an object (World Info)")
    book = _Fields(obj, f"{source}: ")
    scan_depth = settings.scan_depth
    if scan_depth is None:
        scan_depth = book.get("scan_depth", kind=int, default=DEFAULT_SCAN_DEPTH)
    budget = settings.token_budget
    if budget is None:
        budget = book.get("token_budget", kind=int, default=DEFAULT_TOKEN_BUDGET)
    return Lorebook(tuple(_entry(v, where, scan_depth, expand) for where, v in listed), max(1, budget))


def read_lorebook(
    path: Path, settings: LoreSettings | None = None, expand: Callable[[str], str] = str
) -> Lorebook:
    """A lorebook file (either shape); one `PersonaError` naming the file when it does not read."""
    source = display_path(path)
    obj = load_json(read_limited(path, source), f"{source}:")
    return parse_lorebook(obj, source, settings, expand)


def merge(books: list[Lorebook], settings: LoreSettings) -> Lorebook | None:
    """One lorebook of all the persona's books; the budget is the persona's, else the first book's."""
    if not books:
        return None
    budget = settings.token_budget or books[0].token_budget
    return Lorebook(tuple(e for b in books for e in b.entries), budget)
