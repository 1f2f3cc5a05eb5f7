"""`personabot serve`: the HTTP server, until SIGTERM or SIGINT (or `stop`)."""

from __future__ import annotations

import asyncio
import ipaddress
import signal
from collections.abc import Callable

from aiohttp import web

from bot.config import Settings
from bot.errors import ConfigError
from bot.runtime import START_WAIT_SECONDS, load_registry, open_store
from bot.serve import keys
from bot.serve.app import ServeContext, build_app

Say = Callable[[str], None]


def is_loopback(host: str) -> bool:
    """Only this machine can reach the address (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    say: Say | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> int:
    """Serve until `stop` is set or a signal arrives; `on_ready` gets the bound port (0 picks one)."""
    if say is None:

        def say(line: str) -> None:
            print(line, flush=True)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    try:
        return await _serve(settings, stop, say, on_ready)
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)


async def _serve(
    settings: Settings, stop: asyncio.Event, say: Say, on_ready: Callable[[int], None] | None
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
        ctx = ServeContext(store=store, registry=registry, settings=settings)
        runner = web.AppRunner(build_app(ctx), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = _bound_port(runner, port)
            say(f"serving http://{host}:{bound}/v1 (personas: {', '.join(p.slug for p in registry.all())})")
            if on_ready is not None:
                on_ready(bound)
            await stop.wait()
            say("stopping")
        finally:
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
