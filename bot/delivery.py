"""Delivering the outbox through an adapter: claim, post, record the platform ids, retry on failure.

A refusal the platform means for good (`DeliveryRefused`: DMs closed, missing permissions, unknown
chat) fails the row at once with the platform's code and words. Anything else is transient: retried
with capped, jittered backoff until the row's deadline (`delivery.deadline_hours` after it was
written), then failed. `personabot outbox retry` puts failed rows back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import replace
from datetime import timedelta

from adapters.base import DeliveryRefused, DeliveryUnknown, PartialDelivery, PlatformAdapter
from bot.config import DeliverySettings
from bot.outage import OutageLog
from bot.store import Store, outbox
from bot.store.leases import Lease, keep_leases
from bot.store.models import OutboxStatus
from bot.streaming import StreamingRelay
from bot.worker import worker_id

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """Another process holds the row now: this one must not send any more of it."""


class RowJournal:
    """Records an adapter's sends on the outbox row, under the row's lease: the chunk about to be sent
    before its request leaves, the posted ids once it is answered. A process that dies in between
    leaves `inflight_chunk` set, and the next holder does not send that chunk blindly again."""

    def __init__(self, store: Store, lease: Lease) -> None:
        self.store = store
        self.lease = lease

    async def sending(self, index: int, delivered_ids: list[str]) -> None:
        async with self.store.transaction() as session:
            held = await outbox.record_progress(session, self.lease, delivered_ids, inflight=index)
        if not held:
            raise LeaseLost(f"outbox {self.lease.id} is held by another process now")

    async def sent(self, delivered_ids: list[str]) -> None:
        async with self.store.transaction() as session:
            await outbox.record_progress(session, self.lease, delivered_ids)


class OutboxPump:
    """Posts a platform's pending replies; a crash mid-way leaves them pending for the next pump."""

    def __init__(
        self,
        store: Store,
        adapter: PlatformAdapter,
        settings: DeliverySettings | None = None,
        *,
        batch: int = 16,
        poll_seconds: float = 2.0,
        relay: StreamingRelay | None = None,
    ) -> None:
        self.store = store
        self.relay = relay
        self.adapter = adapter
        self.settings = settings or DeliverySettings()
        self.batch = batch
        self.poll_seconds = poll_seconds
        self.owner = f"{worker_id()}:{adapter.platform}"

    async def flush(self) -> int:
        """Deliver everything due when it is called; returns how many replies were posted.

        Recording a posted reply (`mark_delivered`) runs beside the next claim and posts: it needs
        only the row's lease, and the row stays leased (so claimed by nobody else) until it commits.
        A channel's replies are still posted in order: the next claim starts once this batch's posts
        are all answered. Every record is committed before `flush` returns."""
        posted = 0
        lease_seconds = self.settings.lease_seconds
        # Rows claimed and not yet settled; a batch of slow deliveries (rate limits, retries) may
        # outlive the lease, so their leases are renewed until they are.
        unsettled: dict[int, Lease] = {}
        recording: list[asyncio.Task[None]] = []
        async with keep_leases(self.store, outbox.QUEUE, unsettled.values, lease_seconds=lease_seconds):
            try:
                while True:
                    async with self.store.single_statement() as session:
                        due = await outbox.claim(
                            session,
                            platform=self.adapter.platform,
                            owner=self.owner,
                            limit=self.batch,
                            lease_seconds=lease_seconds,
                        )
                    if not due:
                        break
                    unsettled.update((item.lease.id, item.lease) for item in due)
                    # Channels are posted to side by side; one channel's replies go out one by one,
                    # in order.
                    by_channel: dict[str, list[outbox.ClaimedDelivery]] = {}
                    for item in due:
                        by_channel.setdefault(item.reply.channel.key, []).append(item)
                    counts = await asyncio.gather(
                        *(self._post_in_order(items, unsettled, recording) for items in by_channel.values())
                    )
                    posted += sum(counts)
                    if len(due) < self.batch:
                        break  # everything due was claimed; a reply written meanwhile wakes `run`
            finally:
                outcomes = await asyncio.gather(*recording, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # the store failed: `run` logs the outage and tries again
        return posted

    async def _post_in_order(
        self,
        items: list[outbox.ClaimedDelivery],
        unsettled: dict[int, Lease],
        recording: list[asyncio.Task[None]],
    ) -> int:
        count = 0
        for item in items:
            ids = await self._deliver(item)
            if ids is None:
                unsettled.pop(item.lease.id, None)
                continue
            count += 1
            recording.append(asyncio.create_task(self._record(item, ids, unsettled)))
        return count

    async def _record(
        self, item: outbox.ClaimedDelivery, ids: list[str], unsettled: dict[int, Lease]
    ) -> None:
        """Mark a posted reply delivered (its lease renewed until then)."""
        lease = item.lease
        try:
            held = await self.store.group.run(lambda session: outbox.mark_delivered(session, lease, ids))
        finally:
            unsettled.pop(lease.id, None)
        if not held:
            log.warning("outbox %s: posted, but its lease had passed to another process", lease.id)

    async def _deliver(self, item: outbox.ClaimedDelivery) -> list[str] | None:
        """Post one claimed reply; the platform's ids of its chunks, or None when it was not posted
        (the failure is recorded)."""
        reply, lease = item.reply, item.lease
        if item.inflight is not None:  # an earlier holder died waiting for the platform's answer
            await self._unknown(
                item,
                f"chunk {item.inflight + 1} was being sent when its process stopped; it may have been posted",
            )
            return None
        if self.relay is not None:
            await self.relay.settle(reply.job_id)  # a preview being posted right now: wait for its id
            streamed = self.relay.take_streamed(reply.job_id)
            if reply.streamed_id is None and streamed is not None:
                reply = replace(reply, streamed_id=streamed)
        reply = replace(reply, journal=RowJournal(self.store, lease))
        try:
            return await self.adapter.deliver(reply)
        except Exception as exc:
            await self._failed(item, exc)
            return None

    async def _failed(self, item: outbox.ClaimedDelivery, exc: Exception) -> None:
        reply, lease = item.reply, item.lease
        cause = exc.cause if isinstance(exc, PartialDelivery) else exc
        where = f"outbox {reply.outbox_id} to {reply.channel.key}"
        s = self.settings
        async with self.store.transaction() as session:
            if isinstance(exc, PartialDelivery):  # the retry posts only what is missing
                await outbox.record_progress(session, lease, exc.delivered_ids)
            if isinstance(cause, DeliveryUnknown):
                await outbox.mark_unknown(session, lease, error=str(cause))
                log.error(
                    "%s: %s; not resent (check the chat, then `personabot outbox retry %s` sends it)",
                    where,
                    cause,
                    reply.outbox_id,
                )
                return
            if isinstance(cause, DeliveryRefused):
                await outbox.mark_refused(session, lease, code=cause.code, reason=cause.reason)
                log.warning("%s refused for good: %s %s (not retried)", where, cause.code, cause.reason)
                return
            error = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
            status, delay = await outbox.mark_retry(
                session,
                lease,
                error=error,
                backoff_seconds=s.retry_backoff_seconds,
                max_backoff_seconds=s.retry_max_seconds,
                deadline=timedelta(hours=s.deadline_hours),
            )
        if status == OutboxStatus.FAILED:
            log.error("%s failed (%s) and is past its deadline; given up", where, error)
        elif status == OutboxStatus.PENDING:
            log.warning("%s failed (%s); attempt %d, next in %.0f s", where, error, lease.attempt, delay)

    async def _unknown(self, item: outbox.ClaimedDelivery, why: str) -> None:
        async with self.store.transaction() as session:
            await outbox.mark_unknown(session, item.lease, error=why)
        log.error(
            "outbox %s to %s: %s; not resent (check the chat, then `personabot outbox retry %s` sends it)",
            item.reply.outbox_id,
            item.reply.channel.key,
            why,
            item.reply.outbox_id,
        )

    async def run(self, stop: asyncio.Event) -> None:
        outage = OutageLog(f"outbox pump for {self.adapter.platform}", log)
        wakeups, topic = self.store.wakeups, outbox.topic(self.adapter.platform)
        while not stop.is_set():
            wakeups.clear(topic)  # a reply written from now on wakes the wait below
            try:
                await self.flush()
                outage.ok()
            except Exception as exc:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), outage.failed(exc))
                continue
            # Woken when a reply is written; the slow poll catches retries that become due by time.
            await wakeups.wait(topic, self.poll_seconds, stop)
