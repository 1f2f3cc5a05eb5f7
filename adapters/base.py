"""The contract every platform adapter meets.

An adapter only translates: platform events into `bot.events` dataclasses (handed to `on_event`), and
outbox rows into platform API calls. It holds no conversation state and no model; triggers, access
rules, cooldowns and commands live in `bot/` and apply to every platform alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from bot.events import ChannelRef, EventHandler, Incoming, Outgoing, PlatformConventions


class PartialDelivery(Exception):
    """`deliver()` failed after posting some chunks; the outbox records them so a retry skips them."""

    def __init__(self, delivered_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"{len(delivered_ids)} chunk(s) posted, then {type(cause).__name__}: {cause}")
        self.delivered_ids = list(delivered_ids)
        self.cause = cause


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
    """What every adapter offers the runtime. Optional capabilities are the Protocols below; the
    runtime checks for them with `isinstance`, so an adapter has one only by declaring all its parts."""

    platform: str
    conventions: PlatformConventions  # how its users write commands (`bot.dispatch` reads it)

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

    async def edit(self, channel: ChannelRef, platform_message_id: str, text: str) -> None:
        """Replace the text of a message the bot posted (streaming)."""

    async def typing(self, channel: ChannelRef) -> None:
        """Show that a reply is being written."""

    async def stop_receiving(self) -> None:
        """Stop taking new events; delivering, editing and typing keep working until `stop()`."""

    async def stop(self) -> None:
        """Disconnect (after `stop_receiving`, or instead of it)."""


@runtime_checkable
class Previews(Protocol):
    """An adapter that can post a preview of a reply still being generated (edited as it grows)."""

    async def preview(self, channel: ChannelRef, text: str, job_id: int) -> str:
        """Post the first message of a reply still being generated; returns its id.

        Only called with streaming on; the reply's delivery later edits this message.
        """


@runtime_checkable
class StreamingAdapter(Previews, Protocol):
    """An adapter that streams replies where its operator enabled it, at its platform's pace."""

    streaming: bool  # on where the operator enabled it (`[discord] streaming`, `[telegram] streaming`)
    stream_min_interval: float  # seconds between two edits of one preview (the platform's rate limits)
    stream_min_growth: int  # characters a preview must grow by before it is edited again


@runtime_checkable
class AnswersLater(Protocol):
    """An adapter that can post a command's answer for an event stored late (from the ingest spool)."""

    async def answer_later(self, event: Incoming, notice: str) -> None: ...


@runtime_checkable
class ChecksToken(Protocol):
    """An adapter that can check its credentials before `start` (so a bad token fails fast)."""

    async def check_token(self) -> None: ...
