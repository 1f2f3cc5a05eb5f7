"""A process that only runs the worker (`personabot worker`): store, registry, model, signals, heartbeat."""

from __future__ import annotations

import asyncio
import logging
import signal

from bot.config import Settings
from bot.generation.base import Closeable
from bot.heartbeat import Component, Heartbeats, backend_health
from bot.runtime import START_WAIT_SECONDS, install_bundled, load_backend, load_registry, open_store
from bot.stream_follow import StreamPublisher
from bot.worker.core import Worker

log = logging.getLogger(__name__)


async def run_worker_process(settings: Settings) -> int:
    """Work the queue until SIGTERM/SIGINT; returns the exit code (0 after a clean stop)."""
    registry = load_registry(settings)
    backend = await asyncio.to_thread(load_backend, settings, allow_pull=True)
    store = await open_store(settings, wait_seconds=START_WAIT_SECONDS)
    await install_bundled(settings, store, registry, backend.tokenizer)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.info(
            "%s: stopping; the batch in flight finishes or returns to the queue", signal.Signals(signum).name
        )
        stop.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, on_signal, s)
    # Typing indicators and streamed edits happen in the bot processes: they follow the store.
    worker = Worker(settings, store, registry, backend, observers=[StreamPublisher(store)])
    beats = Heartbeats(
        store,
        [
            Component(
                "worker",
                "",
                {"personas": [p.slug for p in registry.all()], "max_batch": settings.worker.max_batch},
                live=backend_health(backend),
            )
        ],
        interval=settings.run.heartbeat_seconds,
        owner=worker.owner,
    )
    try:
        await beats.start()
        log.info(
            "worker %s: %s on %s (%s), max batch %d",
            worker.owner,
            getattr(getattr(backend, "location", None), "display", settings.model.name),
            getattr(backend, "device", "?"),
            getattr(backend, "dtype", "?"),
            settings.worker.max_batch,
        )
        await worker.run(stop)
        log.info("worker %s stopped", worker.owner)
        return 0
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)
        await beats.stop()
        await store.close()
        if isinstance(backend, Closeable):
            backend.close()
