"""SillyTavern macros in persona text: `{{char}}`, `{{user}}`, `{{random:...}}`, `{{roll:...}}` and more.

One function, `expand`, used for every field (system prompt, character definition, greetings, example
dialogues, lore), so a macro means the same everywhere. Random picks are seeded by the persona and the
field, so the text a persona trains on is the text it answers with. `{{time}}`, `{{date}}` and
`{{idle_duration}}` read the context's clock; training uses `TRAINING_CLOCK` so its rows never change.
Unknown macros are left as written.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

# A fixed clock for text that must not change between runs (training rows, example dialogues).
TRAINING_CLOCK = datetime(2024, 1, 1, 12, 0)

_MACRO = re.compile(r"\{\{\s*([A-Za-z_]+)\s*(?:(?:::?)(.*?))?\}\}|<(BOT|USER)>", re.I | re.S)
_ROLL = re.compile(r"^\s*(\d*)\s*(?:d\s*(\d+))?\s*([+-]\s*\d+)?\s*$", re.I)


@dataclass(frozen=True)
class MacroContext:
    char: str  # the V3 nickname when the card has one, else the name
    user: str
    seed: str  # the persona's slug: the same picks wherever its text is expanded
    now: datetime = TRAINING_CLOCK
    idle: timedelta | None = None  # time since the user's last message, when known
    original: str = ""  # what `{{original}}` stands for: we have no global prompt to wrap


def _choices(argument: str) -> list[str]:
    # `{{random::a::b}}` (the newer form) or `{{random:a,b}}` with `\,` for a literal comma.
    if argument.startswith(":") or "::" in argument:
        return argument.lstrip(":").split("::")
    return [p.replace("\0", ",") for p in argument.replace("\\,", "\0").split(",")]


def _roll(argument: str, rng: random.Random) -> str | None:
    match = _ROLL.match(argument)
    if match is None or not (match[1] or match[2]):
        return None
    count, sides = (int(match[1] or 1), int(match[2])) if match[2] else (1, int(match[1]))
    if not (1 <= count <= 100 and 1 <= sides <= 10**6):
        return None
    bonus = int(re.sub(r"\s", "", match[3])) if match[3] else 0
    return str(sum(rng.randint(1, sides) for _ in range(count)) + bonus)


def _duration(idle: timedelta | None) -> str:
    if idle is None:
        return "a while"
    seconds = int(idle.total_seconds())
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return "just now"


def expand(text: str, ctx: MacroContext, field: str = "") -> str:
    """`text` with its macros expanded; `field` names where it comes from (it seeds random picks)."""
    if "{{" not in text and "<" not in text:
        return text
    count = 0

    def one(match: re.Match[str]) -> str:
        nonlocal count
        if match[3]:
            return ctx.char if match[3].upper() == "BOT" else ctx.user
        name, argument = match[1].lower(), match[2]
        if argument is None:
            simple = {
                "char": ctx.char,
                "user": ctx.user,
                "original": ctx.original,
                "time": f"{ctx.now:%I:%M %p}".lstrip("0"),
                "date": f"{ctx.now:%B} {ctx.now.day}, {ctx.now.year}",
                "idle_duration": _duration(ctx.idle),
            }
            return simple.get(name, match[0])
        count += 1
        rng = random.Random(f"{ctx.seed}\0{field}\0{count}\0{argument}")
        if name in ("random", "pick"):
            return rng.choice(_choices(argument))
        if name == "roll":
            rolled = _roll(argument, rng)
            return rolled if rolled is not None else match[0]
        return match[0]

    return _MACRO.sub(one, text)
