"""`POST /v1/chat/completions`: a request queued like any chat message, answered by the worker.

The reply comes back through the `api` adapter (`adapters.api`): its text as it grows for a streaming
request (server-sent events, OpenAI's chunks, then `data: [DONE]`), the final text once the outbox
delivers it. While waiting, the job's state is also read from the store now and then, so a reply
delivered by another process, or a job that failed for good, is noticed too.

A conversation has one request at a time (the next waits), since each request may rewrite the
channel's history (`bot.serve.conversation`). A client that goes away mid-stream does not stop its job:
the reply is generated, stored and marked delivered all the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from adapters.api import ApiAdapter
from adapters.base import ChannelQueues
from bot.config import ServeSettings
from bot.serve import conversation
from bot.serve.auth import api_key
from bot.serve.errors import ApiError
from bot.serve.ratelimit import RateLimiter
from bot.serve.request import CONVERSATION_HEADER, ChatRequest, parse
from bot.store import Store
from bot.store.models import JobStatus
from personas.registry import PersonaRegistry
from personas.versions import get_version

log = logging.getLogger(__name__)

# How often a waiting request reads its job's state from the store (the adapter answers sooner).
POLL_SECONDS = 1.0


@dataclass
class Completions:
    """What the route needs; one per `personabot serve` process."""

    store: Store
    registry: PersonaRegistry
    adapter: ApiAdapter
    limits: ServeSettings
    rates: RateLimiter = field(default_factory=RateLimiter)
    conversations: ChannelQueues = field(default_factory=ChannelQueues)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        key = api_key(request)
        wait = self.rates.check(key.id, key.rate_per_minute)
        if wait is not None:
            raise ApiError(
                429,
                f"Rate limit reached for key {key.name!r}: {key.rate_per_minute} requests per minute. "
                f"Try again in {wait} s.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(wait)},
            )
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "The request body is not valid JSON.") from None
        chat = parse(body, self.limits, request.headers.get(CONVERSATION_HEADER))
        await self._check_model(chat)
        asked = conversation.Conversation(
            key_id=key.id,
            key_name=key.name,
            conversation=chat.conversation,
            persona=chat.persona,
            messages=chat.messages,
            instruction=chat.instruction,
            options=chat.options,
        )
        lock_key = f"{key.id}:{chat.conversation}" if chat.store else f"tmp:{id(asked)}"
        async with self.conversations.hold(lock_key):
            queued = await conversation.enqueue(self.store, asked)
            try:
                if chat.stream:
                    return await self._stream(request, chat, queued)
                return await self._reply(chat, queued)
            finally:
                self.adapter.forget(queued.job_id)
                if not chat.store:
                    # Deleted once the outbox has its reply; the response does not wait for it.
                    _background(conversation.forget_when_delivered(self.store, queued.channel_id))

    async def _check_model(self, chat: ChatRequest) -> None:
        if chat.persona not in self.registry:
            raise ApiError(
                404,
                f"The model `{chat.model}` does not exist: no persona {chat.persona!r} (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )
        if chat.version is not None:
            async with self.store.transaction() as session:
                found = await get_version(session, chat.persona, chat.version)
            if found is None:
                raise ApiError(
                    404,
                    f"The model `{chat.model}` does not exist: persona {chat.persona!r} has no adapter "
                    f"version {chat.version!r}.",
                    param="model",
                    code="model_not_found",
                )

    async def _texts(self, job_id: int) -> AsyncIterator[str | conversation.Outcome]:
        """The reply's text each time it grows, then the job's outcome."""
        waiter = self.adapter.expect(job_id)
        deadline = time.monotonic() + self.limits.reply_timeout_seconds
        sent = ""
        while True:
            if waiter.final is not None:
                yield conversation.Outcome(JobStatus.DONE, waiter.final, None)
                return
            if waiter.text != sent:
                sent = waiter.text
                yield sent
                continue
            waiter.changed.clear()
            try:
                await asyncio.wait_for(waiter.changed.wait(), POLL_SECONDS)
                continue
            except TimeoutError:
                pass
            ended = await conversation.outcome(self.store, job_id)
            if ended is not None and waiter.final is None:
                yield ended
                return
            if time.monotonic() > deadline:
                raise ApiError(
                    504,
                    f"No reply within {self.limits.reply_timeout_seconds:g} s (serve.reply_timeout_seconds); "
                    "the job stays queued and its reply will be stored.",
                    type="timeout",
                    code="timeout",
                )

    async def _reply(self, chat: ChatRequest, queued: conversation.Queued) -> web.Response:
        async for item in self._texts(queued.job_id):
            if isinstance(item, conversation.Outcome):
                text = _final_text(item)
                return web.json_response(
                    {
                        "id": _completion_id(queued.job_id),
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": chat.model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                    }
                )
        raise AssertionError("the reply's texts end with its outcome")

    async def _stream(
        self, request: web.Request, chat: ChatRequest, queued: conversation.Queued
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        sse = _Events(response, _completion_id(queued.job_id), chat.model)
        await sse.chunk({"role": "assistant", "content": ""})
        sent = ""
        try:
            async for item in self._texts(queued.job_id):
                if isinstance(item, str):
                    await sse.chunk({"content": item[len(sent) :]})
                    sent = item
                    continue
                if item.status != JobStatus.DONE:
                    await sse.error(_failure(item))
                    break
                text = item.text or ""
                if text.startswith(sent):
                    if text != sent:
                        await sse.chunk({"content": text[len(sent) :]})
                else:  # a retried attempt wrote another reply than the one streamed; the store has it
                    log.warning("job %s: the final reply differs from the text streamed", queued.job_id)
                await sse.chunk({}, finish_reason="stop")
                await sse.done()
                break
        except ApiError as exc:
            await sse.error(exc)
        if sse.gone:
            log.info("job %s: the client went away mid-stream; its reply is stored", queued.job_id)
        return response


def _completion_id(job_id: int) -> str:
    return f"chatcmpl-pb{job_id}"


def _failure(outcome: conversation.Outcome) -> ApiError:
    return ApiError(
        500,
        f"The reply failed: {outcome.error or 'no reason recorded'}",
        type="server_error",
        code="generation_failed",
    )


def _final_text(outcome: conversation.Outcome) -> str:
    if outcome.status != JobStatus.DONE:
        raise _failure(outcome)
    return outcome.text or ""  # done without a reply: the persona's plugin withheld it


class _Events:
    """Server-sent events in OpenAI's chunk format; a client that went away is written to no more."""

    def __init__(self, response: web.StreamResponse, completion_id: str, model: str) -> None:
        self.response = response
        self.id = completion_id
        self.model = model
        self.created = int(time.time())
        self.gone = False

    async def _send(self, payload: str) -> None:
        if self.gone:
            return
        try:
            await self.response.write(f"data: {payload}\n\n".encode())
        except (ConnectionError, RuntimeError):  # reset by the client, or the transport is closed
            self.gone = True

    async def chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> None:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        await self._send(json.dumps(body))

    async def error(self, exc: ApiError) -> None:
        await self._send(json.dumps(exc.body()))

    async def done(self) -> None:
        await self._send("[DONE]")


_tasks: set[asyncio.Task[None]] = set()


def _background(coro: Any) -> None:
    """Run `coro` on its own, keeping a reference until it ends (asyncio holds tasks weakly)."""
    task = asyncio.create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
