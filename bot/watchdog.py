"""The connection watchdog: a platform connection that ends is loud, is restored, or ends the process.

Each adapter that holds a long-lived connection (the Discord gateway, Telegram's long poll or
webhook server) exposes the task that runs it (`connection()`) and a way to connect again
(`reconnect()`). That task ends only when the connection is lost for good: a library bug, a parser
error on an event the library does not know, a revoked token. Without a watchdog the process would
go on looking healthy while nothing arrives; with it:

1. the end is logged at ERROR, with the exception;
2. the adapter's heartbeat says `failed` (with the error), so `personabot status` shows it;
3. it reconnects, with backoff, up to `run.reconnect_attempts` times;
4. if that fails (or the error is one a reconnect cannot fix), `on_fatal` is called: `personabot run`
   then stops and exits non-zero, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from bot.backoff import backoff

log = logging.getLogger(__name__)


@runtime_checkable
class Reconnectable(Protocol):
    """An adapter whose platform connection the watchdog can watch and restore."""

    platform: str

    def connection(self) -> asyncio.Future[Any] | None:
        """The task holding the platform connection; it ends only when the connection is lost."""

    async def reconnect(self) -> None:
        """Drop what is left of the connection and connect again; raises when it cannot."""


class ConnectionLost(Exception):
    """A connection task ended without an exception (a clean close nobody asked for)."""


def describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


StateHook = Callable[[str, str, dict[str, Any]], Awaitable[None]]  # (platform, state, detail)


class ConnectionWatchdog:
    """Watches every reconnectable adapter until stopped."""

    def __init__(
        self,
        adapters: Sequence[object],
        *,
        attempts: int,
        backoff_seconds: float,
        on_state: StateHook,
        on_fatal: Callable[[str], None],
    ) -> None:
        self.adapters = [a for a in adapters if isinstance(a, Reconnectable)]
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.on_state = on_state
        self.on_fatal = on_fatal
        self.failures: dict[str, int] = {}  # platform -> connections lost so far
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch(a), name=f"watchdog:{a.platform}") for a in self.adapters
        ]

    async def stop(self) -> None:
        """Stop watching (before the adapters are stopped on purpose)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _watch(self, adapter: Reconnectable) -> None:
        while (task := adapter.connection()) is not None:
            await asyncio.wait([task])
            error = _ending(task)
            platform = adapter.platform
            self.failures[platform] = self.failures.get(platform, 0) + 1
            fatal = bool(getattr(error, "fatal", False))
            log.error(
                "the %s connection ended unexpectedly (%s); %s",
                platform,
                describe(error),
                "a reconnect cannot help" if fatal else "reconnecting",
                exc_info=error if not (fatal or isinstance(error, ConnectionLost)) else None,
            )
            failure = {"error": describe(error), "failures": self.failures[platform]}
            await self._state(platform, "failed", failure)
            if fatal:
                self.on_fatal(str(error))
                return
            if not await self._reconnect(adapter, failure):
                return

    async def _reconnect(self, adapter: Reconnectable, failure: dict[str, Any]) -> bool:
        last: BaseException | None = None
        for attempt in range(1, self.attempts + 1):
            await asyncio.sleep(backoff(attempt, base=self.backoff_seconds, cap=60.0, jitter=False))
            try:
                await adapter.reconnect()
            except Exception as exc:
                last = exc
                log.warning(
                    "reconnecting %s failed (attempt %d of %d): %s",
                    adapter.platform,
                    attempt,
                    self.attempts,
                    describe(exc),
                )
                if getattr(exc, "fatal", False):
                    break
                continue
            log.warning("the %s connection is restored (attempt %d)", adapter.platform, attempt)
            await self._state(adapter.platform, "running", {"last_failure": failure})
            return True
        reason = describe(last) if last is not None else "no attempt made"
        self.on_fatal(
            f"{adapter.platform}: the connection was lost ({failure['error']}) and could not be "
            f"restored: {reason}"
        )
        return False

    async def _state(self, platform: str, state: str, detail: dict[str, Any]) -> None:
        try:
            await self.on_state(platform, state, detail)
        except Exception as exc:  # the store may be the thing that is down; the log line stands
            log.warning("could not record the %s adapter as %s: %s", platform, state, describe(exc))


def _ending(task: asyncio.Future[Any]) -> BaseException:
    if task.cancelled():
        return ConnectionLost("the connection task was cancelled")
    return task.exception() or ConnectionLost("the connection closed")
