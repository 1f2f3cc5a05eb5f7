"""One process of personabot: adapters, dispatcher, worker, outbox delivery and scheduler wired together.

`personabot run` builds a `BotApp` from the config; adapter end-to-end tests build one around fake
platforms. Shutdown order matters, so nothing accepted is lost:

1. adapters stop taking events (they can still deliver);
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
from typing import TYPE_CHECKING

from sqlalchemy import update

from adapters.base import PlatformAdapter
from bot.config import Settings
from bot.delivery import OutboxPump
from bot.dispatch import Dispatcher
from bot.events import utcnow
from bot.generation.base import GenerationBackend
from bot.heartbeat import Component, Heartbeats, backend_health
from bot.store import Store
from bot.store.models import ReplyJob
from bot.streaming import StreamingRelay
from bot.worker import Worker
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
        self.dispatcher = Dispatcher(settings, store, registry)
        # An adapter may ask for its platform's edit pace (`stream_min_interval`, `stream_min_growth`).
        self.relays = [
            StreamingRelay(
                a,
                streaming=bool(getattr(a, "streaming", False)),
                min_interval=float(getattr(a, "stream_min_interval", 1.0)),
                min_growth=int(getattr(a, "stream_min_growth", 1)),
            )
            for a in self.adapters
        ]
        self.pumps = [OutboxPump(store, a, relay=r) for a, r in zip(self.adapters, self.relays, strict=True)]
        self.worker = (
            Worker(settings, store, registry, backend, observers=self.relays) if backend is not None else None
        )
        self.scheduler = scheduler
        self.heartbeats = (
            Heartbeats(store, self._components(), interval=settings.run.heartbeat_seconds)
            if heartbeats
            else None
        )
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
            for adapter in self.adapters:
                await adapter.start(self.dispatcher.handle)
                self._started.append(adapter)
            self._pump_tasks = [
                asyncio.create_task(p.run(self._stop), name=f"outbox:{p.adapter.platform}")
                for p in self.pumps
            ]
            if self.worker is not None:
                self._worker_task = asyncio.create_task(self.worker.run(self._stop), name="worker")
            if self.scheduler is not None:
                await self.scheduler.start()
            if self.heartbeats is not None:
                await self.heartbeats.start()
        except BaseException:
            await self.stop(flush_timeout=0)
            raise

    async def stop(self, flush_timeout: float | None = None) -> None:
        """Stop taking events, let the scheduler and worker finish, flush the outbox, disconnect."""
        run = self.settings.run
        for adapter in self._started:
            try:
                await adapter.stop_receiving()
            except Exception:
                log.exception("the %s adapter did not stop receiving cleanly", adapter.platform)
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
                with contextlib.suppress(BaseException):
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

    async def _release_worker_jobs(self) -> None:
        """Jobs the stopped worker still leased: pending again now; the cut attempt is not counted."""
        assert self.worker is not None
        async with self.store.transaction() as session:
            released = await session.execute(
                update(ReplyJob)
                .where(ReplyJob.status == "running", ReplyJob.lease_owner == self.worker.owner)
                .values(
                    status="pending",
                    attempts=ReplyJob.attempts - 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    available_at=utcnow(),
                )
            )
        log.info("returned %d unfinished job(s) to the queue", released.rowcount)
