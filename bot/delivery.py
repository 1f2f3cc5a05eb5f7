"""Delivering the outbox through an adapter: claim, post, record the platform ids, retry on failure."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from adapters.base import PartialDelivery, PlatformAdapter
from bot.store import Store, outbox
from bot.store.leases import keep_leases
from bot.streaming import StreamingRelay
from bot.worker import worker_id

log = logging.getLogger(__name__)


class OutboxPump:
    """Posts a platform's pending replies; a crash mid-way leaves them pending for the next pump."""

    def __init__(
        self,
        store: Store,
        adapter: PlatformAdapter,
        *,
        batch: int = 16,
        lease_seconds: float = 60.0,
        max_attempts: int = 8,
        backoff_seconds: float = 2.0,
        poll_seconds: float = 0.5,
        relay: StreamingRelay | None = None,
    ) -> None:
        self.store = store
        self.relay = relay
        self.adapter = adapter
        self.batch = batch
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.poll_seconds = poll_seconds
        self.owner = f"{worker_id()}:{adapter.platform}"

    async def flush(self) -> int:
        """Deliver everything due now; returns how many replies were posted."""
        posted = 0
        while True:
            async with self.store.transaction() as session:
                due = await outbox.claim(
                    session,
                    platform=self.adapter.platform,
                    owner=self.owner,
                    limit=self.batch,
                    lease_seconds=self.lease_seconds,
                )
            if not due:
                return posted
            # A batch of slow deliveries (rate limits, retries) may outlive the lease: keep renewing
            # the leases of the rows not yet settled.
            unsettled = {item.lease.id: item.lease for item in due}
            async with keep_leases(
                self.store, outbox.QUEUE, unsettled.values, lease_seconds=self.lease_seconds
            ):
                for item in due:
                    posted += await self._deliver(item)
                    unsettled.pop(item.lease.id, None)

    async def _deliver(self, item: outbox.ClaimedDelivery) -> bool:
        """Post one claimed reply and record the outcome; True when it was posted."""
        reply, lease = item.reply, item.lease
        if self.relay is not None and reply.streamed_id is None:
            reply = replace(reply, streamed_id=self.relay.take_streamed(reply.job_id))
        try:
            ids = await self.adapter.deliver(reply)
        except Exception as exc:
            log.warning("delivery of outbox %s failed: %s", reply.outbox_id, type(exc).__name__)
            async with self.store.transaction() as session:
                if isinstance(exc, PartialDelivery):  # the retry posts only what is missing
                    await outbox.record_progress(session, lease, exc.delivered_ids)
                await outbox.mark_failed(
                    session,
                    lease,
                    error=f"{type(exc).__name__}: {exc}",
                    max_attempts=self.max_attempts,
                    backoff_seconds=self.backoff_seconds,
                )
            return False
        async with self.store.transaction() as session:
            held = await outbox.mark_delivered(session, lease, ids)
        if not held:
            log.warning("outbox %s: posted, but its lease had passed to another process", reply.outbox_id)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.flush()
            except Exception:
                log.exception("outbox pump for %s failed; retrying", self.adapter.platform)
            try:
                await asyncio.wait_for(stop.wait(), self.poll_seconds)
            except TimeoutError:
                pass
