"""`personabot run`: every configured part in one process, until SIGTERM or SIGINT.

It applies migrations, starts each platform adapter that has credentials (the console only when asked),
the worker unless `worker.enabled` is false, and the scheduler unless `scheduler.enabled` is false.
One line per part says what started, and what was skipped and why. The first SIGTERM / SIGINT stops it
gracefully (see `BotApp.stop`) and it exits 0; a second one stops it at once. A platform connection
lost and not restored (see `bot.watchdog`) stops it the same way, with exit status 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from adapters.base import ChecksToken, PlatformAdapter
from adapters.console import ConsoleAdapter
from bot.app import BotApp
from bot.config import Settings
from bot.errors import ConfigError
from bot.generation.base import GenerationBackend
from bot.runtime import START_WAIT_SECONDS, install_bundled, load_backend, load_registry, open_store
from bot.store import Store, conversations, jobs
from personas.registry import PersonaRegistry
from personas.versions import active_version

Say = Callable[[str], None]
# A platform connection was lost and could not be restored (bot.watchdog).
EXIT_CONNECTION_LOST = 3


def _platform_adapters(settings: Settings, say: Say) -> list[PlatformAdapter]:
    """Adapters with credentials; the others are reported as skipped, with the reason."""
    adapters: list[PlatformAdapter] = []
    if settings.telegram.resolve_token("TELEGRAM_TOKEN") is None:
        say("telegram: skipped: no TELEGRAM_TOKEN (nor telegram.token or telegram.token_file)")
    else:
        from adapters.telegram import TelegramAdapter

        adapters.append(TelegramAdapter.from_settings(settings))
    if settings.discord.resolve_token("DISCORD_TOKEN") is None:
        say("discord: skipped: no DISCORD_TOKEN (nor discord.token or discord.token_file)")
    else:
        from adapters.discord import DiscordAdapter

        adapters.append(DiscordAdapter.from_settings(settings))
    return adapters


async def _persona_lines(store: Store, registry: PersonaRegistry, say: Say) -> None:
    async with store.transaction() as session:
        for persona in registry.all():
            active = await active_version(session, persona.slug)
            if active is None:
                say(f"persona {persona.slug}: answering with the base model (no adapter active)")
            else:
                loss = f"{active.heldout_loss:.4f}" if active.heldout_loss is not None else "not measured"
                say(f"persona {persona.slug}: answering with adapter {active.version} (held-out loss {loss})")


async def _read_console(
    adapter: ConsoleAdapter, store: Store, stdin: TextIO, on_end: Callable[[], None]
) -> None:
    """The console's lines; at the end of piped input, stop once every reply to it has been delivered."""
    await adapter.read(stdin)
    while True:
        async with store.transaction() as session:
            channel_id = await conversations.find_channel(session, adapter.channel)
            busy = channel_id is not None and await jobs.unanswered(session, channel_id)
        if not busy:
            break
        await asyncio.sleep(0.2)
    on_end()


async def run_bot(
    settings: Settings,
    *,
    console: bool = False,
    console_channel: str = "local",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    say: Say | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until `stop` is set or a signal arrives; returns the exit code (0 after a clean stop)."""
    if say is None:
        stream = sys.stderr if console else sys.stdout

        def say(line: str) -> None:
            print(line, file=stream, flush=True)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        say(f"{signal.Signals(signum).name}: stopping (again to stop at once)")
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)
        stop.set()

    # From the start: a SIGTERM while the model is pulled or loaded is a clean stop too (exit 0).
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, on_signal, s)
    try:
        return await _run(settings, console, console_channel, stdin, stdout, say, stop)
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)


async def load_backend_unless_stopped(settings: Settings, stop: asyncio.Event) -> GenerationBackend | None:
    """The model, loaded (or pulled) in a daemon thread; None when `stop` is set first.

    Not the default executor: `asyncio.run` waits for its threads at exit, so a SIGTERM during a
    pull would wait for the download. A daemon thread is simply left behind.
    """
    loop = asyncio.get_running_loop()
    loaded: asyncio.Future[GenerationBackend] = loop.create_future()

    def settle(outcome: Callable[[], object]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(outcome)

    def resolve(backend: GenerationBackend | None, error: BaseException | None) -> None:
        if loaded.done():
            return
        if backend is not None:
            loaded.set_result(backend)
        else:
            loaded.set_exception(error or RuntimeError("no backend loaded"))

    def work() -> None:
        try:
            backend = load_backend(settings, allow_pull=True)
        except BaseException as exc:
            # bound now: `exc` is unbound when the except block ends, before the callback runs
            settle(functools.partial(resolve, None, exc))
        else:
            settle(functools.partial(resolve, backend, None))

    threading.Thread(target=work, name="load-model", daemon=True).start()
    stopped = asyncio.ensure_future(stop.wait())
    either: list[asyncio.Future[Any]] = [loaded, stopped]  # two result types: asyncio.wait takes one
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if stop.is_set():
        loaded.cancel()
        return None
    return loaded.result()


async def _run(
    settings: Settings,
    console: bool,
    console_channel: str,
    stdin: TextIO | None,
    stdout: TextIO | None,
    say: Say,
    stop: asyncio.Event,
) -> int:
    from bot.scheduler import JobScheduler

    registry = load_registry(settings)
    store = await open_store(settings, wait_seconds=START_WAIT_SECONDS)
    try:
        say(f"database: {store.engine.url.render_as_string(hide_password=True)} (migrations applied)")
        adapters = _platform_adapters(settings, say)
        console_adapter = None
        if console:
            console_adapter = ConsoleAdapter(console_channel, stdout=stdout, interactive=False)
            adapters.append(console_adapter)
        else:
            say("console: skipped: not asked for (--console)")
        for adapter in adapters:  # a bad token says so now, not after the model has loaded
            if isinstance(adapter, ChecksToken):
                await adapter.check_token()
        backend = None
        if settings.worker.enabled:
            backend = await load_backend_unless_stopped(settings, stop)
            if backend is None:
                say("stopped before start-up finished")
                return 0
            await install_bundled(settings, store, registry, backend.tokenizer)
        scheduler = JobScheduler(settings, store, registry) if settings.scheduler.enabled else None
        if not adapters and backend is None and scheduler is None:
            raise ConfigError(
                "nothing to run: no adapter has a token, worker.enabled and scheduler.enabled are false "
                "(set TELEGRAM_TOKEN or DISCORD_TOKEN, or use --console)"
            )
        app = BotApp(settings, store, registry, adapters, backend, scheduler=scheduler, heartbeats=True)
        await app.start()
        try:
            for adapter in adapters:
                extra = f" (channel {console_channel})" if adapter is console_adapter else ""
                say(f"{adapter.platform}: started{extra}")
            if not adapters:
                say("adapters: none started; this process only works the queue and the schedule")
            await _persona_lines(store, registry, say)
            if backend is not None:
                say(f"worker: started ({settings.model.name}, max batch {settings.worker.max_batch})")
            else:
                say(
                    "worker: skipped: worker.enabled is false (separate `personabot worker` processes answer)"
                )
            if scheduler is not None:
                say(
                    f"scheduler: started with {len(scheduler.jobs)} job(s): {', '.join(sorted(scheduler.by_id)) or '-'}"
                )
                for problem in scheduler.problems:
                    say(f"scheduler: {problem.job_id}: not scheduled: {problem.message}")
            else:
                say("scheduler: skipped: scheduler.enabled is false")
            reader = None
            if console_adapter is not None:
                reader = asyncio.create_task(
                    _read_console(console_adapter, store, stdin or sys.stdin, stop.set), name="console-input"
                )
            stopped = asyncio.create_task(stop.wait())
            failed = asyncio.create_task(app.failed.wait())
            await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            failed.cancel()
            if reader is not None:
                reader.cancel()
        finally:
            await app.stop()
        if app.failure is not None:
            say(f"stopped: {app.failure} (exit status 3, so a supervisor restarts it)")
            return EXIT_CONNECTION_LOST
        say("stopped")
        return 0
    finally:
        await store.close()
