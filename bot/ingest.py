"""Taking in platform events so that none is lost while the database is unreachable.

Adapters hand every event to `Ingest.handle` (it wraps the dispatcher). Normally that stores the
event at once. When the database cannot be reached (`database_unreachable`), the event is kept
instead: in memory, up to `ingest.spool_max_events`, and durably in a spool file (`bot.spool`),
fsynced before `handle` returns, so an adapter that confirms the event to its platform after
`handle` (Telegram's polling offset, its webhook's 200) never confirms one that is only in memory.
A background task stores the kept events, oldest first, once the database is back; while any are
waiting, new events queue behind them, so each channel's events are stored in the order they came.

A full spool raises `SpoolFull`: Telegram then leaves the update unconfirmed (Telegram keeps it),
while Discord, which never redelivers, logs the message as lost.

Logging is one WARNING when an outage begins and one when it ends, not a line per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path

from bot.backoff import backoff
from bot.events import DispatchResult, EventHandler, Incoming, NotAccepted, PlatformEvent
from bot.spool import Spooled, SpoolFile, orphans, read_pending
from bot.store.engine import database_unreachable

log = logging.getLogger(__name__)

# Posts a command's answer or a notice for an event that was stored later, from the spool.
Notify = Callable[[Incoming, str], Awaitable[None]]


class SpoolFull(NotAccepted):
    """The database is unreachable and the spool holds `max_events` already."""


class Ingest:
    """Stores events through `handle`, or keeps them until the database is back."""

    def __init__(
        self,
        handle: EventHandler,
        spool_dir: Path,
        stem: str,
        *,
        max_events: int = 10_000,
        retry_seconds: float = 0.5,
        max_retry_seconds: float = 10.0,
        notify: Notify | None = None,
    ) -> None:
        self._handle = handle
        self.spool_dir = spool_dir
        self.stem = stem
        self.max_events = max_events
        self.retry_seconds = retry_seconds
        self.max_retry_seconds = max_retry_seconds
        self.notify = notify
        self._file: SpoolFile | None = None
        self._waiting: deque[Spooled] = deque()
        self._seq = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._outage_since: float | None = None

    @property
    def waiting(self) -> int:
        """Events kept, not stored yet."""
        return len(self._waiting)

    @property
    def path(self) -> Path | None:
        return self._file.path if self._file is not None else None

    async def start(self) -> None:
        """Claim a spool file and take over what a process that died left (replayed in the background)."""
        self._file = SpoolFile.claim(self.spool_dir, self.stem)
        left = self._file.pending()
        adopted = []
        for path in orphans(self.spool_dir, self.stem):
            adopted.append(path)
            left += read_pending(path)
        if left:
            self._file.clear()
            for item in left:
                self._keep(item.event)
            for path in adopted:
                path.unlink(missing_ok=True)
            log.warning("%d event(s) left in the spool by an earlier run; storing them", len(left))
        self._task = asyncio.create_task(self._replay(), name="ingest-replay")

    async def stop(self, timeout: float = 5.0) -> None:
        """Store what is waiting if the database allows within `timeout`; the rest stays in the file."""
        if self._task is not None:
            if self._waiting:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        while self._waiting and not self._task.done():
                            await asyncio.sleep(0.05)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._file is not None:
            if self._waiting:
                log.warning("%d event(s) stay in %s for the next start", len(self._waiting), self._file.path)
            self._file.close(remove=not self._waiting)
            self._file = None

    async def handle(self, event: PlatformEvent) -> DispatchResult:
        """Store the event (answering as the dispatcher does), or keep it while the database is away.

        No lock: adapters pass one channel's events one at a time, so an event either finds events
        waiting (and waits behind them) or is stored before any later event of its channel arrives.
        """
        if not self._waiting:
            try:
                return await self._handle(event)
            except Exception as exc:
                if not database_unreachable(exc) or self._file is None:
                    raise
                self._outage_began(exc)
        try:
            self._keep(event)
        except OSError as exc:  # the disk under the spool failed too
            raise NotAccepted(f"cannot write the spool {self.path}: {exc}") from exc
        return DispatchResult(spooled=True)

    def _keep(self, event: PlatformEvent) -> None:
        assert self._file is not None, "start() first"
        if len(self._waiting) >= self.max_events:
            raise SpoolFull(f"{len(self._waiting)} events wait for the database already")
        self._seq += 1
        self._file.append(self._seq, event)
        self._waiting.append(Spooled(self._seq, event))
        self._wake.set()

    def _outage_began(self, exc: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning(
                "the database is unreachable (%s); keeping incoming events in %s until it is back",
                _short(exc),
                self.path,
            )

    async def _replay(self) -> None:
        failures = 0  # in a row, for the backoff
        while True:
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            item = self._waiting[0]
            try:
                result = await self._handle(item.event)
            except Exception as exc:
                if database_unreachable(exc):
                    self._outage_began(exc)
                    failures += 1
                    await asyncio.sleep(
                        backoff(failures, base=self.retry_seconds, cap=self.max_retry_seconds, jitter=False)
                    )
                    continue
                log.exception(
                    "storing kept %s %s failed; dropped",
                    type(item.event).__name__,
                    item.event.platform_message_id,
                )
                result = None
            failures = 0
            self._waiting.popleft()
            assert self._file is not None
            if self._waiting:
                self._file.done(item.seq)
            else:
                self._file.clear()
                self._recovered()
            if result is not None and result.notice and isinstance(item.event, Incoming) and self.notify:
                try:
                    await self.notify(item.event, result.notice)
                except Exception as exc:
                    log.warning("could not post a late answer in %s: %s", item.event.channel.key, exc)

    def _recovered(self) -> None:
        if self._outage_since is not None:
            log.warning(
                "the database is reachable again after %.1f s; every kept event is stored",
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
