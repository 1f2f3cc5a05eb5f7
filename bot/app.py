"""One process of personabot: adapters, dispatcher, worker and outbox delivery wired together.

`personabot run` builds a `BotApp` from the config; adapter end-to-end tests build one around fake
platforms. Shutdown order matters: adapters stop taking events first, then the worker finishes or
returns its jobs, then the outbox is flushed, so nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from adapters.base import PlatformAdapter
from bot.config import Settings
from bot.delivery import OutboxPump
from bot.dispatch import Dispatcher
from bot.generation.base import GenerationBackend
from bot.store import Store
from bot.streaming import StreamingRelay
from bot.worker import Worker
from personas.registry import PersonaRegistry

log = logging.getLogger(__name__)


class BotApp:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        registry: PersonaRegistry,
        adapters: Sequence[PlatformAdapter],
        backend: GenerationBackend | None = None,
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
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for adapter in self.adapters:
            await adapter.start(self.dispatcher.handle)
        self._tasks = [
            asyncio.create_task(p.run(self._stop), name=f"outbox:{p.adapter.platform}") for p in self.pumps
        ]
        if self.worker is not None:
            self._tasks.append(asyncio.create_task(self.worker.run(self._stop), name="worker"))

    async def stop(self, flush_timeout: float = 10.0) -> None:
        """Stop taking events, let the worker finish its batch, flush the outbox, disconnect."""
        for adapter in self.adapters:
            try:
                await adapter.stop_receiving()
            except Exception:
                log.exception("the %s adapter did not stop receiving cleanly", adapter.platform)
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(flush_timeout):
                for pump in self.pumps:
                    await pump.flush()
        for adapter in self.adapters:
            try:
                await adapter.stop()
            except Exception:
                log.exception("stopping the %s adapter failed", adapter.platform)
