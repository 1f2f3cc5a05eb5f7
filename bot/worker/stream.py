"""Reply observers fed from the generating thread, without ever slowing generation down.

The backend calls `text_from_thread` for every token of every row. Only the newest text of each job is
kept; one flush task per job hands it to the observers on the event loop. A slow observer (a
rate-limited platform edit) therefore sees fewer, larger updates and never builds a backlog, and
`end` waits for a job's last flush so `on_end` always comes after its last `on_text`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence

from bot.streaming import ActiveReply, ReplyObserver

log = logging.getLogger(__name__)


class ObserverFanout:
    def __init__(
        self,
        observers: Sequence[ReplyObserver],
        loop: asyncio.AbstractEventLoop,
        *,
        on_text: Callable[[int, str], None] | None = None,
    ) -> None:
        self.observers = list(observers)
        self.loop = loop
        self.legacy_on_text = on_text  # a plain `(index, text)` callback (the terminal chat)
        self._latest: dict[int, tuple[ActiveReply, str]] = {}
        self._flushing: dict[int, asyncio.Task[None]] = {}
        self._lock = threading.Lock()

    @property
    def wants_text(self) -> bool:
        return bool(self.observers) or self.legacy_on_text is not None

    async def notify(self, event: str, *args: object) -> None:
        for observer in self.observers:
            try:
                await getattr(observer, event)(*args)
            except Exception:
                log.exception("reply observer %s.%s failed", type(observer).__name__, event)

    async def start(self, reply: ActiveReply) -> None:
        await self.notify("on_start", reply)

    def text_from_thread(self, index: int, reply: ActiveReply, text: str) -> None:
        """Called by the backend's thread with a job's whole text so far."""
        if self.legacy_on_text is not None:
            try:
                self.legacy_on_text(index, text)
            except Exception:
                log.exception("on_text callback failed")
        if not self.observers:
            return
        with self._lock:
            first = reply.job_id not in self._latest
            self._latest[reply.job_id] = (reply, text)
        if first:
            self.loop.call_soon_threadsafe(self._spawn, reply.job_id)

    def _spawn(self, job_id: int) -> None:
        if job_id not in self._flushing:
            self._flushing[job_id] = self.loop.create_task(self._flush(job_id))

    async def _flush(self, job_id: int) -> None:
        try:
            while True:
                with self._lock:
                    item = self._latest.pop(job_id, None)
                if item is None:
                    return
                await self.notify("on_text", *item)
        finally:
            self._flushing.pop(job_id, None)

    async def end(self, reply: ActiveReply, ok: bool) -> None:
        """After the job's last text has reached the observers."""
        await asyncio.sleep(0)  # let a `_spawn` scheduled just before run
        task = self._flushing.get(reply.job_id)
        if task is not None:
            await asyncio.shield(task)
        with self._lock:
            self._latest.pop(reply.job_id, None)
        await self.notify("on_end", reply, ok)
