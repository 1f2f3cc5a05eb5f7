"""Group commit: small writes that arrive together share one transaction.

A transaction costs more CPU than a short statement (a pooled connection, BEGIN, COMMIT, on SQLite a
hop to its thread for each). `GroupCommit.run(work)` runs `work(session)` in a transaction shared with
every other `run` that came while the previous shared transaction was being written, so under load many
writes share one commit and an idle system still writes each at once (no waiting for company).

If the shared transaction fails, each `work` is run again alone in its own transaction, so one failing
write fails only its own caller. `work` must therefore touch only the database (it may run twice; only
one run is committed) and must not wait for another transaction of the same store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from bot.store.leases import Transactions

T = TypeVar("T")
Work = Callable[[AsyncSession], Awaitable[Any]]


class GroupCommit:
    def __init__(self, store: Transactions, *, max_batch: int = 64) -> None:
        self.store = store
        self.max_batch = max_batch
        self._waiting: list[tuple[Work, asyncio.Future[Any]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def run(self, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """`work(session)`'s result once its transaction committed; its exception if it failed."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        # Marks the outcome as seen, so a caller cancelled meanwhile leaves no "never retrieved" warning.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append((work, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="group-commit")
        return await asyncio.shield(future)  # a cancelled caller's write still completes

    async def _write(self) -> None:
        batch: list[tuple[Work, asyncio.Future[Any]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self.max_batch]
                del self._waiting[: self.max_batch]
                if len(batch) == 1:
                    await self._alone(*batch[0])
                    continue
                try:
                    async with self.store.transaction() as session:
                        results = [await work(session) for work, _ in batch]
                except Exception:
                    for work, future in batch:  # find the one that fails; the others commit alone
                        await self._alone(work, future)
                    continue
                for (_, future), result in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(result)
        finally:  # cancelled (the loop is closing): nobody may wait forever
            for _, future in [*batch, *self._waiting]:
                if not future.done():
                    future.cancel()
            self._waiting.clear()

    async def _alone(self, work: Work, future: asyncio.Future[Any]) -> None:
        try:
            async with self.store.transaction() as session:
                result = await work(session)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)
