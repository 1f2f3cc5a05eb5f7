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

# The commands a platform's menu offers (Discord's slash commands, Telegram's "/" menu), with the
# line each shows. `/start` is left out: Telegram sends it by itself when a chat opens.
COMMAND_MENU: dict[str, str] = {
    "persona": "Show or change the persona that answers here",
    "personas": "List the available personas",
    "reset": "Start the conversation afresh (history is kept)",
    "help": "What this bot understands",
    "forget": "Erase what the bot stores of you in this channel",
    "optin": "Let your conversations train the personas",
    "optout": "Stop your conversations from training the personas",
}

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
