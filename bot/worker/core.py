"""The generation worker: claims reply jobs, renders each channel's history, generates, writes replies."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence

from bot.config import Settings
from bot.conversation import history_to_turns
from bot.events import ChannelKind, ChannelRef
from bot.generation.base import GenerationBackend, GenerationRequest
from bot.prompting import ChatRenderer, Turn
from bot.store import Store, conversations, jobs
from bot.store.jobs import ClaimedJob
from bot.store.models import Channel
from bot.streaming import ActiveReply, ReplyObserver
from personas.registry import PersonaRegistry

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    """Answers reply jobs from the store with one generation backend."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: PersonaRegistry,
        backend: GenerationBackend,
        *,
        owner: str | None = None,
        on_text: Callable[[int, str], None] | None = None,
        observers: Sequence[ReplyObserver] = (),
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.backend = backend
        self.owner = owner or worker_id()
        self.on_text = on_text
        self.observers = list(observers)
        self._renderers: dict[str, ChatRenderer] = {}

    def renderer(self, template: str) -> ChatRenderer:
        if template not in self._renderers:
            self._renderers[template] = ChatRenderer(self.backend.tokenizer, template)
        return self._renderers[template]

    async def run_once(self) -> int:
        """Claim one batch and answer it; returns how many jobs were claimed."""
        w = self.settings.worker
        async with self.store.transaction() as session:
            claimed = await jobs.claim(
                session,
                owner=self.owner,
                limit=w.max_batch,
                lease_seconds=w.lease_seconds,
                max_attempts=w.max_attempts,
            )
        for job in claimed:
            await self._answer(job)
        return len(claimed)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if await self.run_once() == 0:
                try:
                    await asyncio.wait_for(stop.wait(), self.settings.worker.poll_seconds)
                except TimeoutError:
                    pass

    async def _answer(self, job: ClaimedJob) -> None:
        w = self.settings.worker
        try:
            persona = self.registry.get(job.persona)
            async with self.store.transaction() as session:
                channel = await session.get(Channel, job.channel_id)
                history = await conversations.history(session, job.channel_id)
            assert channel is not None
            turns = history_to_turns(
                history,
                persona=persona.slug,
                group=channel.kind != "direct",
                up_to_message_id=job.trigger_message_id,
            )
            if job.prompt:
                turns.append(Turn("user", job.prompt))
            renderer = self.renderer(persona.spec.template)
            window = persona.spec.context_window or getattr(self.backend, "context_window", 2048)
            rendered = renderer.render_prompt(
                turns,
                system=persona.spec.system_prompt or None,
                max_prompt_tokens=window - persona.spec.sampling.max_new_tokens,
            )
            if rendered.dropped_turns:
                log.info(
                    "job %s: dropped %d old turns to fit the context window", job.id, rendered.dropped_turns
                )
            request = GenerationRequest(
                prompt_ids=rendered.input_ids,
                sampling=persona.spec.sampling,
                stop_ids=tuple(renderer.end_of_turn_ids),
            )
            started = time.perf_counter()
            active = ActiveReply(job.id, _channel_ref(channel), persona.slug)
            result = await self._generate_observed(request, active)
            log.info(
                "job %s: %d tokens in %.2fs (%s)",
                job.id,
                len(result.token_ids),
                time.perf_counter() - started,
                result.finish_reason,
            )
            async with self.store.transaction() as session:
                written = await jobs.complete(
                    session, job, text=result.text, persona=persona.slug, platform=channel.platform
                )
            if written is None:
                log.warning("job %s: lease lost; another worker answered it", job.id)
            await self._notify("on_end", active, True)
        except Exception as exc:  # one failing job must not take the worker down
            log.exception("job %s failed", job.id)
            async with self.store.transaction() as session:
                await jobs.fail(
                    session,
                    job,
                    error=f"{type(exc).__name__}: {exc}",
                    max_attempts=w.max_attempts,
                    backoff_seconds=w.retry_backoff_seconds,
                )

    async def _notify(self, event: str, *args: object) -> None:
        for observer in self.observers:
            try:
                await getattr(observer, event)(*args)
            except Exception:
                log.exception("reply observer %s.%s failed", type(observer).__name__, event)

    async def _generate_observed(self, request: GenerationRequest, active: ActiveReply):  # type: ignore[no-untyped-def]
        """Generate in a thread, passing partial text to the observers on the event loop."""
        loop = asyncio.get_running_loop()
        await self._notify("on_start", active)

        def on_text(index: int, text: str) -> None:
            if self.on_text is not None:
                self.on_text(index, text)
            if self.observers:
                asyncio.run_coroutine_threadsafe(self._notify("on_text", active, text), loop)

        try:
            (result,) = await asyncio.to_thread(self.backend.generate, [request], on_text)
        except BaseException:
            await self._notify("on_end", active, False)
            raise
        return result


def _channel_ref(channel: Channel) -> ChannelRef:
    return ChannelRef(
        platform=channel.platform,
        external_id=channel.external_id,
        kind=ChannelKind(channel.kind),
        thread_id=channel.thread_id,
        title=channel.title,
    )
