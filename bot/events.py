"""The normalized events every platform adapter produces and consumes.

Adapters translate their platform's native objects into these dataclasses and back; nothing else in
personabot knows a platform's API. They are frozen, so a handler cannot change an event under another.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Protocol


class ChannelKind(StrEnum):
    DIRECT = "direct"
    GROUP = "group"


@dataclass(frozen=True)
class ChannelRef:
    """A conversation: a platform channel, or one thread / forum topic inside it."""

    platform: str
    external_id: str
    kind: ChannelKind = ChannelKind.GROUP
    thread_id: str = ""
    title: str = ""

    @property
    def is_direct(self) -> bool:
        return self.kind is ChannelKind.DIRECT

    @property
    def key(self) -> str:
        """`platform:id` or `platform:id/thread`, the form used by the CLI (`--channel`)."""
        base = f"{self.platform}:{self.external_id}"
        return f"{base}/{self.thread_id}" if self.thread_id else base


@dataclass(frozen=True)
class AuthorRef:
    platform: str
    external_id: str
    display_name: str
    is_bot: bool = False
    roles: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.platform}:{self.external_id}"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Incoming:
    """A message someone posted, as every adapter reports it."""

    platform: str
    channel: ChannelRef
    author: AuthorRef
    text: str
    platform_message_id: str
    reply_to: str | None = None
    mentions_bot: bool = False
    sent_at: datetime = field(default_factory=utcnow)
    # True when the message answers one of the bot's own messages (platforms know this cheaply).
    replies_to_bot: bool = False

    @property
    def is_direct(self) -> bool:
        return self.channel.is_direct


@dataclass(frozen=True)
class Edited:
    """A user changed the text of a message the store may hold."""

    platform: str
    channel: ChannelRef
    platform_message_id: str
    text: str
    edited_at: datetime = field(default_factory=utcnow)


@dataclass(frozen=True)
class Deleted:
    """A user deleted a message; its text must never reach a prompt again."""

    platform: str
    channel: ChannelRef
    platform_message_id: str
    deleted_at: datetime = field(default_factory=utcnow)


PlatformEvent = Incoming | Edited | Deleted


@dataclass
class DispatchResult:
    """What the runtime did with an event, so the adapter can show it the platform's way."""

    notice: str | None = None  # a command's answer or a cooldown notice, not part of the conversation
    job_ids: list[int] = field(default_factory=list)  # reply jobs queued for this event
    stored: bool = False  # False for duplicates, commands and ignored events
    ignored: str | None = None  # why nothing happened (blocked user, own message, ...)
    # The database was unreachable: the event waits in the ingest spool (bot.ingest), stored later.
    spooled: bool = False


# What an adapter hands each event to (the runtime's ingest); it answers with what was done.
EventHandler = Callable[[PlatformEvent], Awaitable[DispatchResult]]


class NotAccepted(Exception):
    """The runtime could neither store nor keep an event (the spool is full or unwritable): an
    adapter whose platform redelivers (Telegram) leaves it unconfirmed, so it comes again."""


@dataclass(frozen=True)
class PlatformConventions:
    """How users of a platform address the bot, declared by its adapter and read by the runtime, so the
    runtime's commands work the platform's way without naming a platform."""

    # Characters that start a command ("/" everywhere; Discord adds its text-command prefix, "!").
    command_prefixes: str = "/"
    # A command the platform sends by itself when a user opens a chat with the bot (Telegram's
    # "/start"); the runtime answers it with the persona's greeting. None: the platform sends none.
    opening_command: str | None = None


@dataclass(frozen=True)
class Outgoing:
    """A reply for an adapter to post: one outbox row."""

    outbox_id: int
    channel: ChannelRef
    text: str
    persona: str | None = None
    reply_to: str | None = None
    # Chunks of this reply already posted by an earlier, interrupted delivery; they are not posted again.
    delivered_ids: tuple[str, ...] = ()
    job_id: int | None = None  # the reply job that wrote it (None for scheduled notices and commands)
    # A message already on the platform showing this reply while it streamed: the adapter edits it to
    # the final first chunk instead of posting a new one.
    streamed_id: str | None = None
    # Where an adapter whose sends have no idempotency key records each send before and after it, so a
    # send whose outcome is unknown after a crash is never repeated blindly (None: nothing recorded).
    journal: DeliveryJournal | None = field(default=None, compare=False, repr=False)


class DeliveryJournal(Protocol):
    async def sending(self, index: int, delivered_ids: list[str]) -> None:
        """Chunk `index` is about to be sent (stored before the request leaves)."""

    async def sent(self, delivered_ids: list[str]) -> None:
        """The chunks posted so far, the last one just answered."""
