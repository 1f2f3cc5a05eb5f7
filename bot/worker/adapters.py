"""Keeping the backend's LoRA adapters in step with the active adapter versions in the store.

With each batch it claims, the worker reads `personas.versions.active_versions` (one small query). A newly
activated version is loaded under the name `persona@version` before the batch runs; a version that is
no longer active is unloaded (and its channels' KV caches dropped with it) - once no request in flight
uses it (`busy`: a worker that refills continuously has requests of an earlier claim still streaming). A persona with no active
version answers with the base model. A version whose folder fails to load is remembered with its error:
that persona's jobs fail with the error, and loading is tried again after `retry_seconds` (the files may
be fixed in place) or as soon as another version is activated.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from bot.generation.base import AdapterHost, GenerationBackend

log = logging.getLogger(__name__)


class AdapterUnavailable(Exception):
    """The persona's active adapter version could not be loaded; the message says why."""


@dataclass(frozen=True)
class _Failed:
    path: str
    error: str
    at: float


def adapter_name(persona: str, version: str) -> str:
    return f"{persona}@{version}"


class AdapterSync:
    def __init__(self, backend: GenerationBackend, *, retry_seconds: float = 60.0) -> None:
        self.backend = backend
        self.retry_seconds = retry_seconds
        self.supported = isinstance(backend, AdapterHost)
        self.loaded: dict[str, tuple[str, str]] = {}  # persona -> (adapter name, path)
        self.failed: dict[str, _Failed] = {}  # adapter name -> why it did not load
        self.active: dict[str, tuple[str, str]] = {}  # persona -> (version, path), as last read
        self.retired: set[str] = set()  # adapter names no longer active, unloaded once not busy
        # Versions API requests pin (`slug@version`) that are not active: adapter name -> path, loaded
        # for the claims that ask for them and unloaded once no claim or request in flight does.
        self.pinned: dict[str, str] = {}
        self._warned = False
        self._lock = asyncio.Lock()  # one refresh at a time (claims answered concurrently)

    async def sync(
        self,
        active: dict[str, tuple[str, str]],
        *,
        busy: Collection[str] = (),
        pinned: dict[str, str] | None = None,
    ) -> None:
        """Load/unload adapters to match the active versions (persona -> (version, path), as
        `personas.versions.active_versions` reads them) and the versions this claim pins (adapter name
        -> path, `personas.versions.pinned_versions`); loading runs in a thread.

        An adapter named in `busy` (used by a request in flight) is unloaded at a later sync."""
        async with self._lock:
            await self._sync(active, set(busy))
            if self.supported:
                await self._sync_pinned(pinned or {}, set(busy))

    async def _sync_pinned(self, wanted: dict[str, str], busy: set[str]) -> None:
        host = self.backend
        assert isinstance(host, AdapterHost)
        for name, path in list(self.pinned.items()):
            if wanted.get(name) != path and name not in busy:
                del self.pinned[name]
                if name not in {loaded for loaded, _ in self.loaded.values()}:
                    await asyncio.to_thread(host.unload_adapter, name)
        for name, path in sorted(wanted.items()):
            if name in self.pinned:
                continue
            try:
                await asyncio.to_thread(host.load_adapter, name, Path(path))
            except Exception as exc:  # reported on the jobs that pin it
                self.failed[name] = _Failed(path, str(exc) or type(exc).__name__, time.monotonic())
                log.error("pinned adapter %s failed to load: %s", name, self.failed[name].error)
                continue
            self.failed.pop(name, None)
            self.pinned[name] = path
            log.info("loaded pinned LoRA adapter %s from %s", name, path)

    async def _sync(self, active: dict[str, tuple[str, str]], busy: set[str]) -> None:
        self.active = active
        if not self.supported:
            if self.active and not self._warned:
                log.warning(
                    "the generation backend %s cannot load LoRA adapters; personas answer with the base model",
                    type(self.backend).__name__,
                )
                self._warned = True
            return
        host = self.backend
        assert isinstance(host, AdapterHost)  # `supported` said so
        for persona, (name, _path) in list(self.loaded.items()):
            wanted = self.active.get(persona)
            if wanted is None or adapter_name(persona, wanted[0]) != name or wanted[1] != _path:
                del self.loaded[persona]
                self.retired.add(name)
        for name in sorted(self.retired - busy):
            await asyncio.to_thread(host.unload_adapter, name)
            self.retired.discard(name)
            log.info("unloaded LoRA adapter %s (no longer active)", name)
        for persona, (version, path) in sorted(self.active.items()):
            name = adapter_name(persona, version)
            if persona in self.loaded:
                continue
            self.retired.discard(name)  # active again (a rollback while it was busy): loaded anew below
            if self.pinned.get(name) == path:  # pinned by requests before, active now: already loaded
                del self.pinned[name]
                self.loaded[persona] = (name, path)
                continue
            failed = self.failed.get(name)
            if (
                failed is not None
                and failed.path == path
                and time.monotonic() - failed.at < self.retry_seconds
            ):
                continue
            started = time.perf_counter()
            try:
                size = await asyncio.to_thread(host.load_adapter, name, Path(path))
            except Exception as exc:  # any failure is the adapter's, reported on its persona's jobs
                error = str(exc) if str(exc) else type(exc).__name__
                self.failed[name] = _Failed(path, error, time.monotonic())
                log.error("persona %s: adapter version %s failed to load: %s", persona, version, error)
                continue
            self.failed.pop(name, None)
            self.loaded[persona] = (name, path)
            log.info(
                "loaded LoRA adapter %s from %s (%.1f MiB) in %.2fs",
                name,
                path,
                size / 2**20,
                time.perf_counter() - started,
            )

    def adapter_for(self, persona: str, version: str | None = None) -> str | None:
        """The adapter name a persona's jobs use now (None: the base model); `version` pins one."""
        wanted = self.active.get(persona)
        if version is not None and (wanted is None or wanted[0] != version):
            if not self.supported:
                return None
            name = adapter_name(persona, version)
            if name in self.pinned:
                return name
            failed = self.failed.get(name)
            raise AdapterUnavailable(
                f"persona {persona!r}: adapter version {version!r} "
                + (f"failed to load: {failed.error}" if failed is not None else "is not registered")
            )
        if wanted is None or not self.supported:
            return None
        loaded = self.loaded.get(persona)
        if loaded is not None:
            return loaded[0]
        name = adapter_name(persona, wanted[0])
        failed = self.failed.get(name)
        why = failed.error if failed is not None else "not loaded"
        raise AdapterUnavailable(
            f"persona {persona!r}: adapter version {wanted[0]!r} ({wanted[1]}) failed to load: {why}"
        )
