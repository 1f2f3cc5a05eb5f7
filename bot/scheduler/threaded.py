"""APScheduler's `AsyncIOScheduler`, with every job store access moved off the event loop.

APScheduler 3.x processes due jobs (`_process_jobs`: read due jobs, submit them, write their next run
time) synchronously on the event loop. With the job store in the same SQLite file as the async store,
that write can wait for a transaction the async store holds across an `await`, which cannot finish
while the loop is blocked: a deadlock until the busy timeout fails the scheduler. Here the job store is
only touched from one dedicated thread (start, sync, processing, shutdown), so it waits like any other
writer while the loop goes on. Timers and job execution stay on the loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler, run_in_event_loop
from apscheduler.schedulers.base import STATE_RUNNING, STATE_STOPPED, BaseScheduler

log = logging.getLogger(__name__)

T = TypeVar("T")


class ThreadedScheduler(AsyncIOScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scheduler")
        self._processing: asyncio.Future[Any] | None = None
        self._again = False

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn` in the scheduler's thread (everything that reads or writes the job store)."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(fn, *args, **kwargs)
        )

    @run_in_event_loop
    def wakeup(self) -> None:
        self._stop_timer()
        if self.state != STATE_RUNNING:
            return
        if self._processing is not None:  # one pass at a time; run another right after this one
            self._again = True
            return
        assert self._eventloop is not None
        self._processing = self._eventloop.run_in_executor(self.pool, self._process_jobs)
        self._processing.add_done_callback(self._processed)

    def _processed(self, done: asyncio.Future[Any]) -> None:
        self._processing = None
        if done.cancelled():
            return
        try:
            wait_seconds = done.result()
        except Exception:
            log.exception("scheduler: processing due jobs failed; retrying")
            wait_seconds = self.jobstore_retry_interval
        if self._eventloop is None or self.state == STATE_STOPPED:
            return
        if self._again:
            self._again = False
            wait_seconds = 0
        self._start_timer(wait_seconds)

    async def close(self) -> None:
        """Stop processing, let a pass in progress end, shut down in the scheduler's thread."""
        if self.state == STATE_STOPPED:
            return
        if self.state == STATE_RUNNING:
            self.pause()
        self._stop_timer()
        if self._processing is not None:
            try:
                await asyncio.shield(self._processing)
            except Exception:
                pass  # already logged by _processed
        await self.call(BaseScheduler.shutdown, self, False)
        self._eventloop = None
        self.pool.shutdown(wait=False)


def submit_on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """Call `fn` on `loop`, from the scheduler's thread or from the loop itself."""
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fn()
    else:
        loop.call_soon_threadsafe(fn)
