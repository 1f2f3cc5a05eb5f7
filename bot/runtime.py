"""Building the runtime's parts from settings: store, persona registry, generation backend."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from bot.backoff import backoff
from bot.basemodel import MARKER, default_model_dir, model_sha256, pull_default_model, resolve_model
from bot.config import Settings
from bot.extras import require
from bot.generation.base import GenerationBackend
from bot.store import Store
from bot.store.engine import database_unreachable
from personas.registry import PersonaRegistry

log = logging.getLogger(__name__)


# How long a long-running process (`run`, `worker`) waits at start-up for an unreachable database:
# started together with it, or restarted during its restart, it should not exit for a blip.
START_WAIT_SECONDS = 60.0


async def open_store(settings: Settings, *, wait_seconds: float = 0.0) -> Store:
    """Open the configured database and apply pending migrations.

    While the database is unreachable it is tried again for up to `wait_seconds` (one WARNING says so).
    """
    deadline = time.monotonic() + wait_seconds
    attempt = 0
    while True:
        store = Store(settings.resolved_database_url)
        try:
            await store.upgrade()
        except BaseException as exc:
            await store.close()
            if (
                not isinstance(exc, Exception)
                or not database_unreachable(exc)
                or time.monotonic() >= deadline
            ):
                raise
            attempt += 1
            if attempt == 1:
                log.warning(
                    "the database is unreachable (%s); waiting up to %g s for it",
                    type(exc).__name__,
                    wait_seconds,
                )
            await asyncio.sleep(backoff(attempt, base=0.5, cap=5.0, jitter=False))
            continue
        return store


async def install_bundled(
    settings: Settings, store: Store, registry: PersonaRegistry, tokenizer: Any | None = None
) -> None:
    """Register and activate the personas' shipped adapters on first use (`personas.bundled`); the
    tokenizer is loaded only when one is activated and none is given."""
    from personas.bundled import install_bundled_adapters, untrained, untrained_hint

    def the_tokenizer() -> Any:
        if tokenizer is not None:
            return tokenizer
        from bot.generation.local import load_tokenizer  # imports torch: only when there is none

        return load_tokenizer(resolve_model(settings))

    await install_bundled_adapters(
        store, registry.all(), lambda: model_sha256(resolve_model(settings)), the_tokenizer
    )
    for persona in await untrained(store, registry.all()):
        log.warning("%s", untrained_hint(persona))


def load_registry(settings: Settings) -> PersonaRegistry:
    """Builtin personas, the user's folder (`personas_dir`, default `<data_dir>/personas`), entry points."""
    return PersonaRegistry.from_settings(settings)


def load_backend(settings: Settings, *, allow_pull: bool = False) -> GenerationBackend:
    """The configured generation backend (`generation.backend`); pulls the default model first when
    allowed (the vLLM backend reads only its tokenizer).

    torch is imported only by the local backend, not at module level: a bot process without a worker, or
    with a worker on vLLM, never needs it and starts seconds sooner.
    """
    if settings.generation.backend == "local":
        require("local", 'the local generation backend (generation.backend = "local")')
    if (
        allow_pull
        and settings.model.path is None
        and settings.model.auto_pull
        and not (default_model_dir(settings) / MARKER).is_file()
    ):
        log.warning("the default model is not pulled yet; pulling it once now")
        pull_default_model(settings)
    if settings.generation.backend == "vllm":
        from bot.generation.vllm import VllmBackend

        return VllmBackend.from_settings(settings)
    from bot.generation.local import LocalBackend

    return LocalBackend(
        resolve_model(settings),
        settings.model.device,
        settings.model.dtype,
        weights=settings.model.weights,
        compile_decode=settings.model.compile,
    )
