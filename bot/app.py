"""One process of personabot: adapters, dispatcher, worker, outbox delivery and scheduler wired together.

`personabot run` builds a `BotApp` from the config; adapter end-to-end tests build one around fake
platforms. Shutdown order matters, so nothing accepted is lost:

1. adapters stop taking events (they can still deliver); events waiting in the ingest spool for an
   unreachable database get `run.flush_timeout_seconds` to be stored, the rest stay in its file;
2. the scheduler fires nothing more and gives running jobs the stop timeout;
3. the worker finishes its batch within `run.stop_timeout_seconds`; jobs it still holds after that go
   back to the queue at once (not after their lease expires);
4. the outbox is flushed within `run.flush_timeout_seconds`; what is left stays queued for next time;
5. adapters disconnect, and the heartbeats say `stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapters.base import AnswersLater, PlatformAdapter, StreamingAdapter
from bot.config import Settings
from bot.delivery import OutboxPump
from bot.dispatch import Dispatcher
from bot.events import Incoming
from bot.generation.base import GenerationBackend
from bot.heartbeat import Component, Heartbeats, backend_health
from bot.ingest import Ingest
from bot.store import Store, jobs, streams
from bot.stream_follow import StreamFollower, StreamPublisher
from bot.streaming import StreamingRelay
from bot.watchdog import ConnectionWatchdog
from bot.worker import Worker, worker_id
from personas.registry import PersonaRegistry

if TYPE_CHECKING:
    from bot.scheduler import JobScheduler

log = logging.getLogger(__name__)


class BotApp:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: PersonaRegistry,
        adapters: Sequence[PlatformAdapter],
        backend: GenerationBackend | None = None,
        *,
        scheduler: JobScheduler | None = None,
        heartbeats: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self.registry = registry
        self.adapters = list(adapters)
        self.dispatcher = Dispatcher(
            settings, store, registry, conventions={a.platform: a.conventions for a in self.adapters}
        )
        # Between the adapters and the dispatcher: events the database cannot take now wait here.
        self.ingest = Ingest(
            self.dispatcher.handle,
            settings.data_dir / "spool",
            "+".join(sorted({a.platform for a in self.adapters})) or "none",
            max_events=settings.run.spool_max_events,
            notify=self._answer_late,
        )
        # A streaming adapter sets its platform's edit pace; the others get typing indicators only.
        self.relays = [
            StreamingRelay(
                a,
                streaming=a.streaming,
                min_interval=a.stream_min_interval,
                min_growth=a.stream_min_growth,
                remember=self._remember_preview,
            )
            if isinstance(a, StreamingAdapter)
            else StreamingRelay(a, remember=self._remember_preview)
            for a in self.adapters
        ]
        self.pumps = [
            OutboxPump(store, a, settings.delivery, relay=r)
            for a, r in zip(self.adapters, self.relays, strict=True)
        ]
        # Replies that workers in other processes generate, shown through this process's relays.
        self.followers = [
            StreamFollower(store, r, f"{worker_id()}:{r.adapter.platform}") for r in self.relays
        ]
        # This process's worker feeds its relays directly, and the store for platforms served elsewhere.
        served = {a.platform for a in self.adapters}
        self.worker = (
            Worker(
                settings,
                store,
                registry,
                backend,
                observers=[*self.relays, StreamPublisher(store, skip_platforms=served)],
            )
            if backend is not None
            else None
        )
        self.scheduler = scheduler
        self.heartbeats = (
            Heartbeats(store, self._components(), interval=settings.run.heartbeat_seconds)
            if heartbeats
            else None
        )
        self.watchdog = ConnectionWatchdog(
            self.adapters,
            attempts=settings.run.reconnect_attempts,
            backoff_seconds=settings.run.reconnect_backoff_seconds,
            on_state=self._adapter_state,
            on_fatal=self._fail,
        )
        # Set when a platform connection is lost for good; `personabot run` then exits non-zero.
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self._stop = asyncio.Event()
        self._pump_tasks: list[asyncio.Task[None]] = []
        self._worker_task: asyncio.Task[None] | None = None
        self._started: list[PlatformAdapter] = []

    def _components(self) -> list[Component]:
        parts = [Component("adapter", a.platform) for a in self.adapters]
        if self.worker is not None:
            parts.append(
                Component(
                    "worker",
                    "",
                    {"personas": [p.slug for p in self.registry.all()]},
                    live=backend_health(self.worker.backend),
                )
            )
        if self.scheduler is not None:
            parts.append(Component("scheduler", "", {"jobs": sorted(self.scheduler.by_id)}))
        return parts

    async def start(self) -> None:
        """Start everything; if a part fails to start, what already started is stopped again."""
        try:
            if self.adapters:
                await self.ingest.start()
            for adapter in self.adapters:
                await adapter.start(self.ingest.handle)
                self._started.append(adapter)
            self._pump_tasks = [
                asyncio.create_task(p.run(self._stop), name=f"outbox:{p.adapter.platform}")
                for p in self.pumps
            ] + [asyncio.create_task(f.run(self._stop), name=f"streams:{f.platform}") for f in self.followers]
            if self.worker is not None:
                self._worker_task = asyncio.create_task(self.worker.run(self._stop), name="worker")
            if self.scheduler is not None:
                await self.scheduler.start()
            if self.heartbeats is not None:
                await self.heartbeats.start()
            self.watchdog.start()
        except BaseException:
            await self.stop(flush_timeout=0)
            raise

    async def stop(self, flush_timeout: float | None = None) -> None:
        """Stop taking events, let the scheduler and worker finish, flush the outbox, disconnect."""
        run = self.settings.run
        await self.watchdog.stop()  # from here on, a connection that ends was ended on purpose
        for adapter in self._started:
            try:
                await adapter.stop_receiving()
            except Exception:
                log.exception("the %s adapter did not stop receiving cleanly", adapter.platform)
        await self.ingest.stop(run.flush_timeout_seconds)
        if self.scheduler is not None:
            await self.scheduler.stop(run.stop_timeout_seconds)
        self._stop.set()
        if self._worker_task is not None:
            done, _ = await asyncio.wait([self._worker_task], timeout=run.stop_timeout_seconds)
            if not done:
                log.warning(
                    "the worker did not finish within %gs; its jobs go back to the queue",
                    run.stop_timeout_seconds,
                )
                self._worker_task.cancel()
                # Its end is the cancellation asked for, or an error already logged by the worker.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await self._worker_task
                await self._release_worker_jobs()
        await asyncio.gather(*self._pump_tasks, return_exceptions=True)
        timeout = run.flush_timeout_seconds if flush_timeout is None else flush_timeout
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    for pump in self.pumps:
                        if pump.adapter in self._started:
                            await pump.flush()
        for adapter in self._started:
            try:
                await adapter.stop()
            except Exception:
                log.exception("stopping the %s adapter failed", adapter.platform)
        self._started = []
        if self.heartbeats is not None:
            await self.heartbeats.stop()

    async def _answer_late(self, event: Incoming, notice: str) -> None:
        """A command's answer for an event stored from the spool, posted the adapter's way."""
        for adapter in self._started:
            if adapter.platform == event.platform and isinstance(adapter, AnswersLater):
                await adapter.answer_later(event, notice)

    async def _adapter_state(self, platform: str, state: str, detail: dict[str, Any]) -> None:
        if self.heartbeats is not None:
            await self.heartbeats.set_state("adapter", platform, state, detail)

    def _fail(self, reason: str) -> None:
        log.error("giving up: %s", reason)
        self.failure = reason
        self.failed.set()

    async def _remember_preview(self, job_id: int, streamed_id: str) -> None:
        async with self.store.transaction() as session:
            await streams.remember_preview(session, job_id, streamed_id)

    async def _release_worker_jobs(self) -> None:
        """Jobs the stopped worker still leased: pending again now; the cut attempt is not counted."""
        assert self.worker is not None
        async with self.store.transaction() as session:
            released = await jobs.release_owner(session, self.worker.owner)
        log.info("returned %d unfinished job(s) to the queue", released)
