"""Watching replies while they are generated: typing indicators and streamed partial text.

The worker tells every `ReplyObserver` when a job starts, as its text grows, and when it ends. In
`personabot run` a `StreamingRelay` per adapter turns that into typing indicators and, where the
persona's platform config enables streaming, a message edited as tokens arrive. The streamed message's
id is stored with its job (`remember`), and the final reply's delivery edits that message instead of
posting a second one, even after a restart. A worker in another process reaches the relay through the
store (`bot.stream_follow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from adapters.base import PlatformAdapter, Previews
from bot.events import ChannelRef

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveReply:
    job_id: int
    channel: ChannelRef
    persona: str


class ReplyObserver(Protocol):
    async def on_start(self, reply: ActiveReply) -> None: ...

    async def on_text(self, reply: ActiveReply, text: str) -> None:
        """The reply's text so far (the whole of it, not a delta)."""

    async def on_end(self, reply: ActiveReply, ok: bool) -> None: ...


class StreamingRelay:
    """Typing indicators and streamed edits for one adapter's channels.

    While a reply for one of the adapter's channels is being generated, the typing indicator is
    refreshed every `typing_interval` seconds. With `streaming` on, the first partial text is posted
    and then edited as it grows, at most once per `min_interval` seconds and only after it grew by
    `min_growth` characters, ending in `marker` until the final reply replaces it.
    """

    def __init__(
        self,
        adapter: PlatformAdapter,
        *,
        streaming: bool = False,
        min_interval: float = 1.0,
        min_growth: int = 1,
        typing_interval: float = 4.0,  # platforms show "typing" for ~5 s; refresh before it lapses
        marker: str = " …",
        clock: Callable[[], float] = time.monotonic,
        remember: Callable[[int, str], Awaitable[None]] | None = None,
    ) -> None:
        self.adapter = adapter
        # Streaming needs an adapter that can post previews (`adapters.base.Previews`).
        if streaming and not isinstance(adapter, Previews):
            raise TypeError(f"the {adapter.platform} adapter cannot stream: it has no preview()")
        self._previews: Previews | None = adapter if isinstance(adapter, Previews) else None
        self.streaming = streaming
        self.min_interval = min_interval
        self.min_growth = min_growth
        self.typing_interval = typing_interval
        self.marker = marker
        self.clock = clock
        self.remember = remember  # stores a preview's id with its job, so a restart edits it too
        self._typing: dict[int, asyncio.Task[None]] = {}
        self._posted: dict[int, str] = {}  # job id -> platform id of the streamed message
        self._shown: dict[int, tuple[float, int]] = {}  # job id -> (time, length) of the last edit
        self._finished: dict[int, str] = {}  # streamed ids of ended jobs, until the outbox takes them
        # One post or edit in flight per reply: partials arriving meanwhile are skipped (the next one
        # carries their text too), so a slow platform never gets two previews of one reply.
        self._busy: dict[int, asyncio.Lock] = {}
        # Jobs whose final reply is being delivered: a partial arriving late must not overwrite it.
        self._closed: OrderedDict[int, None] = OrderedDict()

    def _mine(self, reply: ActiveReply) -> bool:
        return reply.channel.platform == self.adapter.platform

    async def on_start(self, reply: ActiveReply) -> None:
        if self._mine(reply):
            self._typing[reply.job_id] = asyncio.create_task(self._keep_typing(reply))

    async def _keep_typing(self, reply: ActiveReply) -> None:
        while True:
            try:
                await self.adapter.typing(reply.channel)
            except Exception as exc:  # a typing indicator is cosmetic; never fail a reply over it
                log.debug("typing in %s failed: %s", reply.channel.key, type(exc).__name__)
            await asyncio.sleep(self.typing_interval)

    async def on_text(self, reply: ActiveReply, text: str) -> None:
        # Only between on_start and on_end: a partial delivered late must not post a second preview.
        if not (self.streaming and reply.job_id in self._typing and text.strip()):
            return
        if reply.job_id in self._closed:
            return
        lock = self._busy.setdefault(reply.job_id, asyncio.Lock())
        if lock.locked():
            return
        async with lock:
            await self._show(reply, text)

    async def _show(self, reply: ActiveReply, text: str) -> None:
        now = self.clock()
        try:
            if reply.job_id not in self._posted:
                assert self._previews is not None  # `streaming` is on only for adapters that preview
                posted = await self._previews.preview(reply.channel, text + self.marker, reply.job_id)
                self._posted[reply.job_id] = posted
                self._shown[reply.job_id] = (now, len(text))
                if self.remember is not None:
                    await self.remember(reply.job_id, posted)
                return
            last_time, last_len = self._shown[reply.job_id]
            if now - last_time >= self.min_interval and len(text) - last_len >= self.min_growth:
                await self.adapter.edit(reply.channel, self._posted[reply.job_id], text + self.marker)
                self._shown[reply.job_id] = (now, len(text))
        except Exception as exc:  # streaming is best effort; the outbox delivers the final text anyway
            log.warning("streaming to %s failed: %s", reply.channel.key, type(exc).__name__)

    async def on_end(self, reply: ActiveReply, ok: bool) -> None:
        self._closed.pop(reply.job_id, None)
        task = self._typing.pop(reply.job_id, None)
        if task is not None:
            task.cancel()
        lock = self._busy.pop(reply.job_id, None)
        if lock is not None:
            async with lock:  # let a preview being posted finish, so its id is known below
                pass
        self._shown.pop(reply.job_id, None)
        posted = self._posted.pop(reply.job_id, None)
        if posted is not None:
            if ok:
                self._finished[reply.job_id] = posted
            else:
                with contextlib.suppress(Exception):
                    await self.adapter.edit(reply.channel, posted, "(no reply: generation failed)")

    async def settle(self, job_id: int | None) -> None:
        """The job's final reply is about to be delivered: show no more partials of it, and wait for
        a preview or edit in flight (a preview's id is needed, an edit must not land after the reply)."""
        if job_id is None:
            return
        self._closed[job_id] = None
        while len(self._closed) > 1024:  # jobs whose on_end came first are never popped by it
            self._closed.popitem(last=False)
        lock = self._busy.get(job_id)
        if lock is not None:
            async with lock:
                pass

    def take_streamed(self, job_id: int | None) -> str | None:
        """The streamed message of a finished job, which its final delivery edits in place."""
        if job_id is None:
            return None
        return self._finished.pop(job_id, None) or self._posted.get(job_id)
