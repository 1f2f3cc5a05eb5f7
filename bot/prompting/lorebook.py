"""Lorebooks (SillyTavern's World Info): which entries a conversation activates, and the text they add.

Pure functions over plain data; the renderer calls `activate` and puts the result around the system
prompt, so training and replies see the same lore and the window fitting counts it. The semantics
follow the Character Card V2 `character_book` and SillyTavern's documented World Info behaviour:

- an entry is scanned for in the last `scan_depth` messages (its own depth, else the book's);
  `constant` entries are always in, disabled ones never;
- a key matches as a substring (case-insensitive unless `case_sensitive`), or as a regex when written
  `/pattern/flags`;
- a `selective` entry also needs its `secondary_keys`, by `selective_logic`: `and_any` (one of them),
  `and_all` (all), `not_any` (none), `not_all` (not all);
- activated entries are admitted while they fit the `token_budget`: constant ones first, then by
  `priority` (its `insertion_order` when unset), highest first; admitted entries are written in
  `insertion_order` (lower is higher up), `before_char` entries before the character definition and
  `after_char` ones after it.

Recursive scanning (entries activating entries) is not done. Lore is text: it never becomes structure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

Position = Literal["before_char", "after_char"]
SelectiveLogic = Literal["and_any", "not_all", "not_any", "and_all"]
# Between lore entries, and between lore and the character definition.
ENTRY_SEPARATOR = "\n"
BLOCK_SEPARATOR = "\n\n"
DEFAULT_SCAN_DEPTH = 2
DEFAULT_TOKEN_BUDGET = 400

_REGEX_KEY = re.compile(r"^/(.+)/([a-z]*)$", re.S)


@dataclass(frozen=True)
class LoreEntry:
    content: str
    keys: tuple[str, ...] = ()
    secondary_keys: tuple[str, ...] = ()
    selective: bool = False
    selective_logic: SelectiveLogic = "and_any"
    constant: bool = False
    enabled: bool = True
    case_sensitive: bool = False
    insertion_order: int = 100
    priority: int | None = None
    position: Position = "before_char"
    scan_depth: int = DEFAULT_SCAN_DEPTH
    name: str = ""  # its name or comment, for reports
    source: str = field(default="", compare=False)  # `lorebook.json: entries.3`, for reports

    @cached_property
    def _matchers(self) -> tuple[_Matcher, ...]:
        return tuple(_matcher(k, self.case_sensitive) for k in self.keys if k.strip())

    @cached_property
    def _secondary(self) -> tuple[_Matcher, ...]:
        return tuple(_matcher(k, self.case_sensitive) for k in self.secondary_keys if k.strip())

    @property
    def label(self) -> str:
        return self.name or (self.keys[0] if self.keys else self.content[:40])


@dataclass(frozen=True)
class _Matcher:
    """One key: a plain substring (in the lowered text unless case-sensitive) or a regex."""

    key: str
    needle: str
    lowered: bool
    regex: re.Pattern[str] | None = None

    def found(self, text: str, lower: str) -> bool:
        if self.regex is not None:
            return self.regex.search(text) is not None
        return self.needle in (lower if self.lowered else text)


def _matcher(key: str, case_sensitive: bool) -> _Matcher:
    match = _REGEX_KEY.match(key)
    if match is not None:
        flags = 0
        for letter, flag in (("i", re.I), ("m", re.M), ("s", re.S)):
            flags |= flag if letter in match[2] else 0
        try:
            return _Matcher(key, key, False, re.compile(match[1], flags))
        except re.error:
            pass  # not a valid regex: a literal key that happens to look like one
    return _Matcher(key, key if case_sensitive else key.lower(), not case_sensitive)


@dataclass(frozen=True)
class Lorebook:
    entries: tuple[LoreEntry, ...]
    token_budget: int = DEFAULT_TOKEN_BUDGET


@dataclass(frozen=True)
class Fired:
    """An activated entry and why: `constant`, or the keys found."""

    entry: LoreEntry
    reason: str
    tokens: int = 0
    admitted: bool = True  # False: activated but over the token budget


@dataclass(frozen=True)
class LoreInsertion:
    before: str
    after: str
    fired: tuple[Fired, ...] = field(default=())

    @property
    def tokens(self) -> int:
        return sum(f.tokens for f in self.fired if f.admitted)


def _found(matchers: Sequence[_Matcher], text: str, lower: str) -> list[str]:
    return [m.key for m in matchers if m.found(text, lower)]


def why(entry: LoreEntry, scanned: Callable[[int], tuple[str, str]]) -> str | None:
    """Why `entry` activates given the scanned text (and its lowercase) at each depth, or None."""
    if not entry.enabled:
        return None
    if entry.constant:
        return "constant"
    if entry.scan_depth <= 0:
        return None
    text, lower = scanned(entry.scan_depth)
    primary = _found(entry._matchers, text, lower)
    if not primary:
        return None
    reason = f"key {primary[0]!r} in the last {entry.scan_depth} message(s)"
    if not entry.selective or not entry._secondary:
        return reason
    secondary = _found(entry._secondary, text, lower)
    logic, total = entry.selective_logic, len(entry._secondary)
    ok = {
        "and_any": bool(secondary),
        "and_all": len(secondary) == total,
        "not_any": not secondary,
        "not_all": len(secondary) < total,
    }[logic]
    if not ok:
        return None
    shown = f"secondary {secondary[0]!r}" if secondary else "no secondary key"
    return f"{reason}, {shown} ({logic})"


def activate(
    book: Lorebook, messages: Sequence[str], count_tokens: Callable[[str], int], *, budget: int | None = None
) -> LoreInsertion:
    """The lore `messages` (oldest first; only the last few are read) activate, within the budget."""
    joined: dict[int, tuple[str, str]] = {}

    def scanned(depth: int) -> tuple[str, str]:
        pair = joined.get(depth)
        if pair is None:
            text = "\n".join(messages[-depth:])
            pair = joined[depth] = (text, text.lower())
        return pair

    activated = [(i, e, r) for i, e in enumerate(book.entries) if (r := why(e, scanned)) is not None]
    limit = book.token_budget if budget is None else budget
    ranked = sorted(
        activated,
        key=lambda a: (
            not a[1].constant,
            -(a[1].priority if a[1].priority is not None else a[1].insertion_order),
            a[0],
        ),
    )
    used = 0
    fired: dict[int, Fired] = {}
    for index, entry, reason in ranked:
        tokens = count_tokens(entry.content) + 1  # one for the separator
        admitted = used + tokens <= limit
        used += tokens if admitted else 0
        fired[index] = Fired(entry, reason, tokens, admitted)
    placed = sorted((f.entry.insertion_order, i) for i, f in fired.items() if f.admitted)
    blocks = {"before_char": [], "after_char": []}  # type: dict[str, list[str]]
    for _, index in placed:
        entry = fired[index].entry
        blocks[entry.position].append(entry.content.strip())
    return LoreInsertion(
        ENTRY_SEPARATOR.join(b for b in blocks["before_char"] if b),
        ENTRY_SEPARATOR.join(b for b in blocks["after_char"] if b),
        tuple(fired[i] for i in sorted(fired)),
    )


def compose(system: str | None, lore: LoreInsertion) -> str | None:
    """The system prompt with the lore around it; None stays None when no lore fired."""
    parts = [p for p in (lore.before, system or "", lore.after) if p]
    return BLOCK_SEPARATOR.join(parts) if parts else system


def scan_window(contents: Sequence[str], roles: Sequence[str]) -> list[str]:
    """What lore is scanned in: the messages up to the last user message (the one being answered), so a
    training row and the prompt for its last reply activate the same entries."""
    last_user = max((i for i, r in enumerate(roles) if r == "user"), default=len(contents) - 1)
    return list(contents[: last_user + 1])
