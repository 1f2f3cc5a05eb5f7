"""Heartbeats: each running component keeps one row of `heartbeats` fresh, so `personabot status`
can tell what runs, what stopped cleanly, and what went silent (crashed, or its machine is gone).

A component is named `<kind>:<name>@<host>:<pid>` (`adapter:telegram@bot1:4242`, `worker@bot1:4242`);
its `detail` says its state (`running`, `stopped`) and beat interval, from which status derives
"stale": not seen for three intervals.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bot.generation.base import GenerationBackend, RemoteBackend
from bot.outage import OutageLog
from bot.store import Store, heartbeats
from bot.worker import worker_id

log = logging.getLogger(__name__)


@dataclass
class Component:
    kind: str  # adapter | worker | scheduler
    name: str  # the platform for adapters; empty otherwise
    detail: dict[str, Any] = field(default_factory=dict)
    state: str = "running"  # running | failed (a lost platform connection) | stopped
    # Read at every beat and merged into `detail`: state that changes (a remote backend's health).
    live: Callable[[], dict[str, Any]] | None = None

    def key(self, owner: str) -> str:
        label = f"{self.kind}:{self.name}" if self.name else self.kind
        return f"{label}@{owner}"


def backend_health(backend: GenerationBackend) -> Callable[[], dict[str, Any]] | None:
    """A worker component's live detail: its generation backend's `health()` (None when it has none)."""
    if not isinstance(backend, RemoteBackend):
        return None
    return lambda: {"generation": backend.health()}


async def beat(store: Store, component: str, kind: str, detail: dict[str, Any]) -> None:
    """Insert or refresh one component's row."""
    async with store.transaction() as session:
        await heartbeats.beat(session, component, kind, detail)


class Heartbeats:
    """Beats for the components of one process, every `interval` seconds until stopped."""

    def __init__(
        self, store: Store, components: list[Component], *, interval: float, owner: str | None = None
    ):
        self.store = store
        self.components = components
        self.interval = interval
        self.owner = owner or worker_id()
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def beat_all(self) -> None:
        for c in self.components:
            detail = c.detail | (c.live() if c.live is not None else {})
            detail |= {"state": c.state, "interval": self.interval, "owner": self.owner}
            await beat(self.store, c.key(self.owner), c.kind, detail)

    async def set_state(self, kind: str, name: str, state: str, detail: dict[str, Any]) -> None:
        """A component's new state (and what explains it), written at once rather than at the next beat."""
        for c in self.components:
            if c.kind == kind and c.name == name:
                c.state = state
                c.detail = {k: v for k, v in c.detail.items() if k not in ("error", "last_failure")} | detail
        await self.beat_all()

    async def _loop(self) -> None:
        outage = OutageLog("heartbeats", log)
        while not self._stop.is_set():
            try:
                await self.beat_all()
                outage.ok()
            except (
                Exception
            ) as exc:  # a busy or unreachable store must not stop the bot; the next beat retries
                outage.failed(exc)
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval)
            except TimeoutError:
                pass

    async def start(self) -> None:
        await self.beat_all()  # the first beat before anything else, so status sees the process at once
        self._task = asyncio.create_task(self._loop(), name="heartbeats")

    async def stop(self) -> None:
        """Last beat: `stopped`, so status tells a clean stop from a crash (nothing if never started).

        A component that failed stays `failed`: the process is stopping because of it.
        """
        self._stop.set()
        if self._task is None:
            return
        await self._task
        for c in self.components:
            if c.state != "failed":
                c.state = "stopped"
        try:
            await self.beat_all()
        except Exception:
            log.warning("could not record the stop in heartbeats", exc_info=True)
