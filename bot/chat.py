"""`personabot chat`: a conversation in the terminal through the same path as every platform.

Each line goes through the dispatcher into the store, the worker answers the reply job, and the outbox
pump delivers the reply to the console adapter.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from adapters.console import ConsoleAdapter
from bot.config import Settings
from bot.delivery import OutboxPump
from bot.dispatch import Dispatcher
from bot.events import DispatchResult
from bot.runtime import install_bundled, load_backend, load_registry, open_store
from bot.store import Store, conversations, jobs
from bot.store.models import JobStatus
from bot.worker import Worker


async def run_chat(
    settings: Settings,
    *,
    persona: str | None = None,
    channel: str = "local",
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    interactive: bool | None = None,
) -> None:
    stdin = stdin or sys.stdin
    registry = load_registry(settings)
    if persona is not None:
        registry.get(persona)  # an unknown persona fails here, before anything is written
    backend = await asyncio.to_thread(load_backend, settings, allow_pull=True)
    store = await open_store(settings)
    try:
        await install_bundled(settings, store, registry, backend.tokenizer)
        adapter = ConsoleAdapter(channel, stdout=stdout, interactive=interactive)
        dispatcher = Dispatcher(settings, store, registry)
        worker = Worker(settings, store, registry, backend, on_text=adapter.on_partial)
        pump = OutboxPump(store, adapter)
        await adapter.start(dispatcher.handle)
        if persona is not None:
            async with store.transaction() as session:
                channel_id = await conversations.upsert_channel(session, adapter.channel)
                await conversations.bind_persona(session, channel_id, persona, bound_by=adapter.author.key)
        await adapter.read(stdin, lambda result: _answer(adapter, worker, pump, store, result, settings))
    finally:
        await store.close()


async def _answer(
    adapter: ConsoleAdapter,
    worker: Worker,
    pump: OutboxPump,
    store: Store,
    result: DispatchResult,
    settings: Settings,
) -> None:
    """Work the line's reply jobs in this process, deliver the replies, and say which failed."""
    for job_id in result.job_ids:
        await _wait_for_job(worker, store, job_id, settings.worker.poll_seconds)
    await pump.flush()
    for job_id in result.job_ids:
        async with store.transaction() as session:
            state = await jobs.state(session, job_id)
        if state is not None and state.status == JobStatus.FAILED:
            adapter.show(f"(no reply: {state.error})")


async def _wait_for_job(worker: Worker, store: Store, job_id: int, poll: float) -> None:
    while True:
        async with store.transaction() as session:
            state = await jobs.state(session, job_id)
        if state is None or state.status in (JobStatus.DONE, JobStatus.FAILED):
            return
        if await worker.run_once() == 0:
            await asyncio.sleep(poll)
