"""The normalized events every platform adapter produces and consumes.

Adapters translate their platform's native objects into these dataclasses and back; nothing else in
personabot knows a platform's API. They are frozen, so a handler cannot change an event under another.
"""

from __future__ import annotations

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
