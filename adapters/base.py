"""The contract every platform adapter meets.

An adapter only translates: platform events into `bot.events` dataclasses (handed to `on_event`), and
outbox rows into platform API calls. It holds no conversation state and no model; triggers, access
rules, cooldowns and commands live in `bot/` and apply to every platform alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from bot.events import ChannelRef, Outgoing, PlatformEvent


@dataclass
class DispatchResult:
    """What the runtime did with an event, so the adapter can show it the platform's way."""

    notice: str | None = None  # a command's answer or a cooldown notice, not part of the conversation
    job_ids: list[int] = field(default_factory=list)  # reply jobs queued for this event
    stored: bool = False  # False for duplicates, commands and ignored events
    ignored: str | None = None  # why nothing happened (blocked user, own message, ...)
    # The database was unreachable: the event waits in the ingest spool (bot.ingest), stored later.
    spooled: bool = False


EventHandler = Callable[[PlatformEvent], Awaitable[DispatchResult]]


class PartialDelivery(Exception):
    """`deliver()` failed after posting some chunks; the outbox records them so a retry skips them."""

    def __init__(self, delivered_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"{len(delivered_ids)} chunk(s) posted, then {type(cause).__name__}: {cause}")
        self.delivered_ids = list(delivered_ids)
        self.cause = cause


class NotAccepted(Exception):
    """The runtime could neither store nor keep an event (the spool is full or unwritable): an
    adapter whose platform redelivers (Telegram) leaves it unconfirmed, so it comes again."""


class ChannelQueues:
    """One lock per channel, so its events are handled one at a time, in the order they arrived.

    The ingest spool (`bot.ingest`) relies on it: it keeps a channel's events in order only if the
    adapter hands them over one at a time.
    """

    def __init__(self) -> None:
        self._locks: dict[int | str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, channel_id: int | str) -> AsyncIterator[None]:
        lock, users = self._locks.get(channel_id, (asyncio.Lock(), 0))
        self._locks[channel_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[channel_id]
            if users <= 1:
                del self._locks[channel_id]
            else:
                self._locks[channel_id] = (lock, users - 1)


class DeliveryRefused(Exception):
    """The platform refused the reply for good (the user closed their DMs, the bot lacks permission,
    the chat is gone): retrying cannot help, so the outbox fails the row at once.

    `code` is "<HTTP status>/<platform error code>" ("403/50007"), or the status alone where the
    platform has no code of its own; `reason` is the platform's own words.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = reason


class DeliveryUnknown(Exception):
    """A send left for the platform but its answer never came (read timeout, connection dropped
    after the request): the message may or may not be posted. On a platform without idempotency keys
    it must not be sent again blindly; the outbox marks the row `unknown` for an operator."""


@runtime_checkable
class PlatformAdapter(Protocol):
    """What every adapter offers the runtime."""

    platform: str

    async def start(self, on_event: EventHandler) -> None:
        """Connect and begin passing events to `on_event`; returns once connected."""

    async def deliver(self, reply: Outgoing) -> list[str]:
        """Post a reply (split to the platform's limit); returns the platform ids of every chunk.

        `reply.delivered_ids` holds chunks an interrupted earlier attempt already posted; those chunks
        are skipped and their ids returned first. A failure after some chunks were posted raises
        `PartialDelivery` with their ids, so the retry does not post them again. A refusal that no
        retry can change is `DeliveryRefused` (as the cause of a `PartialDelivery`, if chunks went
        out before it); any other exception is taken as transient and retried with backoff.
        """

    async def preview(self, channel: ChannelRef, text: str, job_id: int) -> str:
        """Post the first message of a reply still being generated (streaming); returns its id.

        Only called for adapters with `streaming` on; the reply's delivery later edits this message.
        """

    async def edit(self, channel: ChannelRef, platform_message_id: str, text: str) -> None:
        """Replace the text of a message the bot posted (streaming)."""

    async def typing(self, channel: ChannelRef) -> None:
        """Show that a reply is being written."""

    async def stop_receiving(self) -> None:
        """Stop taking new events; delivering, editing and typing keep working until `stop()`."""

    async def stop(self) -> None:
        """Disconnect (after `stop_receiving`, or instead of it)."""
