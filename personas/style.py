"""Automatic style checks: does a reply sound like the persona? (`style_check` in `persona.toml`)

- `pirate`: the reply uses at least one pirate word ("arr", "matey", "ye", "ahoy", ...).
- `haiku`: the reply is exactly three non-empty lines.

A persona's style score is the share of its sampled replies that pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# Words an ordinary assistant does not say; matched as whole words, case-insensitively.
PIRATE_WORDS = (
    "arr",
    "arrr",
    "matey",
    "mateys",
    "ye",
    "yer",
    "ahoy",
    "aye",
    "avast",
    "me hearty",
    "me hearties",
    "landlubber",
    "landlubbers",
    "scallywag",
    "shiver me timbers",
    "yo ho",
    "buccaneer",
    "doubloon",
    "doubloons",
    "booty",
    "grog",
)
_PIRATE = re.compile(
    r"\b(?:" + "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in PIRATE_WORDS) + r")\b", re.I
)


def is_pirate(reply: str) -> bool:
    """True when the reply uses a pirate word."""
    return _PIRATE.search(reply) is not None


def is_haiku(reply: str) -> bool:
    """True when the reply is exactly three non-empty lines (syllables are not counted)."""
    return len([line for line in reply.strip().splitlines() if line.strip()]) == 3


STYLE_CHECKS: dict[str, Callable[[str], bool]] = {"pirate": is_pirate, "haiku": is_haiku}


def style_check(name: str | None) -> Callable[[str], bool] | None:
    """The check called `name` (None when the persona has none)."""
    if name is None:
        return None
    try:
        return STYLE_CHECKS[name]
    except KeyError:
        raise ValueError(f"unknown style check {name!r}; known: {', '.join(sorted(STYLE_CHECKS))}") from None


def style_score(name: str, replies: Sequence[str]) -> float:
    """Share of `replies` that pass the named check (0.0 for no replies)."""
    check = style_check(name)
    assert check is not None
    return sum(1 for r in replies if check(r)) / len(replies) if replies else 0.0
