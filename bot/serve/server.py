"""`personabot serve`: the HTTP server, the `api` adapter's outbox and (by default) a worker, in one
process, until SIGTERM or SIGINT (or `stop`).

It is `personabot run` with the API as its one platform (`bot.app.BotApp`): requests are stored and
queued, the worker answers them with the chat platforms' jobs, and the outbox delivers the replies to
the waiting requests. With `serve.worker = false` (`--no-worker`) separate `personabot worker`
processes on the same database answer instead.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

from aiohttp import web

from bot.app import BotApp
from bot.config import Settings
from bot.errors import ConfigError
from bot.generation.base import GenerationBackend
from bot.launch import load_backend_unless_stopped
from bot.runtime import START_WAIT_SECONDS, install_bundled, load_registry, open_store
from bot.serve import keys
from bot.serve.app import ServeContext, build_app
from bot.serve.auth import is_loopback

Say = Callable[[str], None]


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    say: Say | None = None,
    on_ready: Callable[[int], None] | None = None,
    backend: GenerationBackend | None = None,
) -> int:
    """Serve until `stop` is set or a signal arrives; `on_ready` gets the bound port (0 picks one).

    `backend`: the worker's generation backend (default: the configured one, loaded here)."""
    if say is None:

        def say(line: str) -> None:
            print(line, flush=True)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    try:
        return await _serve(settings, stop, say, on_ready, backend)
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)


async def _serve(
    settings: Settings,
    stop: asyncio.Event,
    say: Say,
    on_ready: Callable[[int], None] | None,
    backend: GenerationBackend | None,
) -> int:
    host, port = settings.serve.host, settings.serve.port
    registry = load_registry(settings)
    store = await open_store(settings, wait_seconds=START_WAIT_SECONDS)
    try:
        if not await keys.any_active(store):
            if not is_loopback(host):
                raise ConfigError(
                    f"refusing to serve on {host}: no API key exists, so anyone who can reach it could use "
                    "it; create one with `personabot apikey create NAME` or bind to 127.0.0.1"
                )
            say("api keys: none; open to clients on this machine (create one to require it)")
        if settings.serve.worker and backend is None:
            backend = await load_backend_unless_stopped(settings, stop)
            if backend is None:
                say("stopped before start-up finished")
                return 0
        if backend is not None:
            await install_bundled(settings, store, registry, backend.tokenizer)
        ctx = ServeContext(store=store, registry=registry, settings=settings)
        bot = BotApp(
            settings,
            store,
            registry,
            [ctx.adapter],
            backend if settings.serve.worker else None,
            heartbeats=True,
        )
        runner = web.AppRunner(
            build_app(ctx), access_log=None, shutdown_timeout=settings.run.flush_timeout_seconds
        )
        await runner.setup()
        await bot.start()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = _bound_port(runner, port)
            worker = "worker in this process" if bot.worker is not None else "answered by `personabot worker`"
            say(
                f"serving http://{host}:{bound}/v1 ({worker}; personas: {', '.join(p.slug for p in registry.all())})"
            )
            if on_ready is not None:
                on_ready(bound)
            await stop.wait()
            say("stopping")
        finally:
            await bot.stop()  # the worker's batch is finished and its replies delivered to the requests
            await runner.cleanup()
        say("stopped")
        return 0
    finally:
        await store.close()


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return asked
