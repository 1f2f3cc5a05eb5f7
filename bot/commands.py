"""Chat commands (`/persona`, `/personas`, `/reset`, ...), the same on every platform.

Adapters pass commands as ordinary `Incoming` messages; the dispatcher recognises them here. Commands
are never stored as conversation turns.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import Incoming

COMMAND_RE = re.compile(
    r"^\s*(?P<prefix>[/!])(?P<name>[A-Za-z][A-Za-z0-9_]{0,31})(?:@\S+)?(?:\s+(?P<args>.*))?$", re.S
)


@dataclass(frozen=True)
class ParsedCommand:
    name: str
    args: str


def parse_command(text: str, prefixes: str = "/") -> ParsedCommand | None:
    """`/persona pirate` or `/persona@MyBot pirate` (Telegram) -> ParsedCommand; None for plain text."""
    match = COMMAND_RE.match(text)
    if match is None or match["prefix"] not in prefixes:
        return None
    return ParsedCommand(match["name"].lower(), (match["args"] or "").strip())


@dataclass(frozen=True)
class CommandContext:
    event: Incoming
    args: str
    session: AsyncSession
    channel_id: int
    is_admin: bool


CommandHandler = Callable[[CommandContext], Awaitable[str]]
