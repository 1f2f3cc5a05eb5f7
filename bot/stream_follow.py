"""Typing indicators and streamed edits when the worker runs in another process.

The worker's `StreamPublisher` (a reply observer) writes each reply's growing text to the store
(`bot.store.streams`); the bot process serving that platform runs a `StreamFollower`, which hands what it
reads to its `StreamingRelay` as if the worker ran beside it. Each write wakes the follower at once (in
one process, or through PostgreSQL's NOTIFY); the publisher writes a reply's text at most every
`min_interval` seconds, and the relay edits at its platform's pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from datetime import timedelta

from bot.events import utcnow
from bot.outage import OutageLog
from bot.store import Store, streams
from bot.streaming import ActiveReply, StreamingRelay

log = logging.getLogger(__name__)

# A stream not written for this long while "running" lost its worker (SIGKILL): stop showing it.
STALE = timedelta(seconds=30)


class StreamPublisher:
    """A reply observer that writes replies being generated to the store, for another process."""

    def __init__(
        self, store: Store, *, skip_platforms: Collection[str] = (), min_interval: float = 0.3
    ) -> None:
        self.store = store
        self.skip = set(skip_platforms)  # platforms whose relay runs beside this worker
        self.min_interval = min_interval
        self._written: dict[int, float] = {}  # job id -> when its text was last written

    async def on_start(self, reply: ActiveReply) -> None:
        if reply.channel.platform in self.skip:
            return
        self._written[reply.job_id] = 0.0
        async with self.store.transaction() as session:
            await streams.started(session, reply.job_id, reply.channel.platform)

    async def on_text(self, reply: ActiveReply, text: str) -> None:
        last = self._written.get(reply.job_id)
        now = time.monotonic()
        if last is None or now - last < self.min_interval:
            return  # a later text carries this one's words too; the final reply goes by the outbox
        self._written[reply.job_id] = now
        async with self.store.transaction() as session:
            await streams.grew(session, reply.job_id, reply.channel.platform, text)

    async def on_end(self, reply: ActiveReply, ok: bool) -> None:
        if self._written.pop(reply.job_id, None) is None:
            return
        async with self.store.transaction() as session:
            await streams.ended(session, reply.job_id, reply.channel.platform, ok)


class StreamFollower:
    """Shows, through one adapter's relay, the replies that workers in other processes generate."""

    def __init__(self, store: Store, relay: StreamingRelay, owner: str, *, poll_seconds: float = 2.0) -> None:
        self.store = store
        self.relay = relay
        self.platform = relay.adapter.platform
        self.owner = owner
        self.poll_seconds = poll_seconds
        self._active: dict[int, ActiveReply] = {}
        self._shown: dict[int, str] = {}
        self._edits: dict[int, asyncio.Task[None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        outage = OutageLog(f"stream follower for {self.platform}", log)
        wakeups, topic = self.store.wakeups, streams.topic(self.platform)
        try:
            while not stop.is_set():
                wakeups.clear(topic)
                try:
                    await self.once()
                    outage.ok()
                except Exception as exc:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), outage.failed(exc))
                    continue
                # While replies stream, look again soon even without a wake-up (a stale stream ends).
                await wakeups.wait(topic, 1.0 if self._active else self.poll_seconds, stop)
        finally:
            for job_id in list(self._active):
                await self._end(job_id, False)

    async def once(self) -> None:
        async with self.store.transaction() as session:
            rows = await streams.follow(session, self.platform, self.owner)
        finished = []
        stale_before = utcnow() - STALE
        for row in rows:
            reply = self._active.get(row.job_id)
            if reply is None:
                if row.state != "running":
                    finished.append(row.job_id)
                    continue
                reply = self._active[row.job_id] = ActiveReply(row.job_id, row.channel, row.persona)
                self._shown[row.job_id] = ""
                await self.relay.on_start(reply)
            if row.text and row.text != self._shown.get(row.job_id):
                self._shown[row.job_id] = row.text
                previous = self._edits.get(row.job_id)
                if previous is None or previous.done():  # the relay skips texts arriving mid-edit anyway
                    self._edits[row.job_id] = asyncio.create_task(self.relay.on_text(reply, row.text))
            if row.state != "running" or row.updated_at < stale_before:
                await self._end(row.job_id, row.state == "done")
                finished.append(row.job_id)
        if finished:
            async with self.store.transaction() as session:
                await streams.forget(session, finished)

    async def _end(self, job_id: int, ok: bool) -> None:
        reply = self._active.pop(job_id)
        self._shown.pop(job_id, None)
        edit = self._edits.pop(job_id, None)
        if edit is not None:
            with contextlib.suppress(Exception):
                await edit
        await self.relay.on_end(reply, ok)
