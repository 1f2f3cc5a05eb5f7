"""Building the runtime's parts from settings: store, persona registry, generation backend."""

from __future__ import annotations

import logging

from bot.basemodel import MARKER, default_model_dir, pull_default_model, resolve_model
from bot.config import Settings
from bot.generation.base import GenerationBackend
from bot.store import Store
from personas.registry import PersonaRegistry

log = logging.getLogger(__name__)


async def open_store(settings: Settings) -> Store:
    """Open the configured database and apply pending migrations."""
    store = Store(settings.resolved_database_url)
    try:
        await store.upgrade()
    except BaseException:
        await store.close()
        raise
    return store


def load_registry(settings: Settings) -> PersonaRegistry:
    """Builtin personas, the user's folder (`personas_dir`, default `<data_dir>/personas`), entry points."""
    return PersonaRegistry.from_settings(settings)


def load_backend(settings: Settings, *, allow_pull: bool = False) -> GenerationBackend:
    """The configured generation backend (`generation.backend`); pulls the default model first when
    allowed (the vLLM backend reads only its tokenizer, and imports no torch)."""
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

    return LocalBackend(resolve_model(settings), settings.model.device, settings.model.dtype)
