"""Quiet, honest logging of a loop whose store calls fail for a while (a database restart or blip).

A loop (the outbox pump, the worker) reports each round: `failed(exc)` or `ok()`. An outage gives one
WARNING line when it starts, one ERROR line with the traceback if it lasts past `escalate_after`
seconds, and one line when it ends, instead of a traceback per retry; the delay before the next round
grows with capped backoff. An exception that is not a connection failure is a bug: it is logged with
its traceback every time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from bot.backoff import backoff

_OUTAGES: tuple[type[BaseException], ...] = (OSError, OperationalError, InterfaceError, TimeoutError)


def is_outage(exc: BaseException) -> bool:
    """The store could not be reached (refused, reset, restarting), as opposed to a bug."""
    if isinstance(exc, _OUTAGES):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


class OutageLog:
    def __init__(
        self,
        component: str,
        logger: logging.Logger,
        *,
        escalate_after: float = 60.0,
        base_delay: float = 0.5,
        max_delay: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.component = component
        self.log = logger
        self.escalate_after = escalate_after
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self.since: float | None = None  # when the current outage began
        self.failures = 0
        self.escalated = False

    def failed(self, exc: BaseException) -> float:
        """Record a failed round; returns how long to wait before the next one."""
        self.failures += 1
        if not is_outage(exc):
            self.log.error("%s failed; retrying", self.component, exc_info=exc)
            return backoff(self.failures, base=self.base_delay, cap=self.max_delay)
        now = self.clock()
        if self.since is None:
            self.since = now
            self.log.warning(
                "%s: the database is unreachable (%s); retrying until it is back",
                self.component,
                _one_line(exc),
            )
        elif not self.escalated and now - self.since >= self.escalate_after:
            self.escalated = True
            self.log.error(
                "%s: the database has been unreachable for %.0f s; still retrying",
                self.component,
                now - self.since,
                exc_info=exc,
            )
        return backoff(self.failures, base=self.base_delay, cap=self.max_delay)

    def ok(self) -> None:
        """Record a round that worked; ends an outage with one line."""
        if self.since is not None:
            self.log.info("%s: the database is back after %.1f s", self.component, self.clock() - self.since)
        self.since = None
        self.failures = 0
        self.escalated = False


def _one_line(exc: BaseException) -> str:
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = " ".join(str(cause).split())
    return f"{type(cause).__name__}: {text}"[:200] if text else type(cause).__name__
