"""The `api` platform: replies to requests of the OpenAI-compatible API (`personabot serve`).

Requests enter through `bot.serve` (stored and queued like any platform's messages); the worker answers
them through the same queue, and the outbox delivers each reply here. Delivering means handing the text
to the HTTP request waiting for it (`expect`), and streaming means handing it the text so far, through
the same streaming relay that edits Discord and Telegram messages. A reply nobody waits for any more
(the client went away, or this process restarted) is still stored and marked delivered.
"""

from __future__ import annotations

import asyncio
import logging

from bot.events import ChannelRef, EventHandler, Outgoing, PlatformConventions

log = logging.getLogger(__name__)

PLATFORM = "api"
# What `bot.streaming.StreamingRelay` appends to a preview: not part of the reply, so taken off again.
RELAY_MARKER = " …"


class ReplyWaiter:
    """The text of one job's reply as it grows, for the HTTP request waiting for it."""

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.text = ""  # the longest partial text so far
        self.final: str | None = None
        self.changed = asyncio.Event()

    def partial(self, text: str) -> None:
        # Only growth: a retried attempt starts over, and what a client was sent cannot be taken back.
        if self.final is None and len(text) > len(self.text) and text.startswith(self.text):
            self.text = text
            self.changed.set()

    def finish(self, text: str) -> None:
        if self.final is None:
            self.final = text
            self.changed.set()


def _stream_id(job_id: int) -> str:
    return f"job-{job_id}"


class ApiAdapter:
    """Delivers replies to waiting HTTP requests; holds no conversation state (the store does)."""

    platform = PLATFORM
    # Requests are stored without passing the dispatcher (`bot.serve.conversation`): text that looks
    # like a command is never read as one here.
    conventions = PlatformConventions()
    streaming = True
    stream_min_interval = 0.0  # a local HTTP stream has no rate limit: every partial is passed on
    stream_min_growth = 1

    def __init__(self) -> None:
        self._waiting: dict[int, ReplyWaiter] = {}

    def expect(self, job_id: int) -> ReplyWaiter:
        """Register a request waiting for `job_id`'s reply (call `forget` when it stops waiting)."""
        waiter = self._waiting.get(job_id)
        if waiter is None:
            waiter = self._waiting[job_id] = ReplyWaiter(job_id)
        return waiter

    def forget(self, job_id: int) -> None:
        self._waiting.pop(job_id, None)

    async def start(self, on_event: EventHandler) -> None:
        return None  # requests arrive over HTTP (`bot.serve`), not as platform events

    async def preview(self, channel: ChannelRef, text: str, job_id: int) -> str:
        waiter = self._waiting.get(job_id)
        if waiter is not None:
            waiter.partial(text.removesuffix(RELAY_MARKER))
        return _stream_id(job_id)

    async def edit(self, channel: ChannelRef, platform_message_id: str, text: str) -> None:
        if not platform_message_id.startswith("job-") or not text.endswith(RELAY_MARKER):
            return  # only the relay's growing previews; its "(no reply: ...)" notice is not a reply
        waiter = self._waiting.get(int(platform_message_id.removeprefix("job-")))
        if waiter is not None:
            waiter.partial(text.removesuffix(RELAY_MARKER))

    async def deliver(self, reply: Outgoing) -> list[str]:
        waiter = self._waiting.get(reply.job_id) if reply.job_id is not None else None
        if waiter is not None:
            waiter.finish(reply.text)
        else:
            log.debug("api reply %s: nobody is waiting for it any more; kept in the store", reply.outbox_id)
        return [f"api-{reply.outbox_id}"]

    async def typing(self, channel: ChannelRef) -> None:
        return None

    async def stop_receiving(self) -> None:
        return None

    async def stop(self) -> None:
        for waiter in self._waiting.values():
            waiter.changed.set()  # wake requests still waiting; they read the store instead
