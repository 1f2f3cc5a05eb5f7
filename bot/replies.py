"""A generated reply before it is stored: speaker prefixes in group chats, and what the guard did.

In a group chat the model may begin its reply with a speaker's name ("Alecilopi: ..."), copying how
chat logs look. `speaker_prefix` recognises such a start; the worker strips it before the reply is
stored (so it never reaches a later prompt), and `personabot eval` counts how often the model wrote
one. `speaker_stops` are the stop texts that end a reply where the model starts writing the next
speaker's line ("\\nalice:").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# One to three name-like words (letters first; digits, dots, dashes and apostrophes inside), optional
# markdown bold or brackets, then a colon and text on the same line: "Alice:", "**Bob**:", "[carol]:".
_PREFIX = re.compile(
    r"^\s*[\[*(]*([^\W\d_][\w'.\-]{0,31}(?: [^\W\d_][\w'.\-]{0,31}){0,2})[\])*]*[ \t]*:[ \t]+(?=\S)"
)


def speaker_prefix(text: str) -> str | None:
    """The leading `Name:` of `text` (the name), or None."""
    match = _PREFIX.match(text)
    return match.group(1) if match else None


@dataclass(frozen=True)
class CleanedReply:
    text: str
    stripped_prefix: str | None  # the speaker name removed from the start, if any


def clean_reply(text: str, *, group: bool) -> CleanedReply:
    """The reply as it is stored: in group chats, leading `Name:` prefixes removed (all of them)."""
    text = text.strip()
    first: str | None = None
    while group and (match := _PREFIX.match(text)) is not None:
        first = first or match.group(1)
        text = text[match.end() :].strip()
    return CleanedReply(text, first)


def speaker_stops(names: Iterable[str]) -> tuple[str, ...]:
    """Stop texts for a group chat: each speaker's name at the start of a new line, then a colon."""
    found = sorted({n.strip() for n in names if n and n.strip()})
    return tuple(f"\n{name}:" for name in found)
