"""Building the runtime's parts from settings: store, persona registry, generation backend."""

from __future__ import annotations

import logging
from typing import Any

from bot.basemodel import MARKER, default_model_dir, model_sha256, pull_default_model, resolve_model
from bot.config import Settings
from bot.generation.local import LocalBackend
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


async def install_bundled(
    settings: Settings, store: Store, registry: PersonaRegistry, tokenizer: Any | None = None
) -> None:
    """Register and activate the personas' shipped adapters on first use (`personas.bundled`); the
    tokenizer is loaded only when one is activated and none is given."""
    from bot.generation.local import load_tokenizer
    from personas.bundled import install_bundled_adapters

    await install_bundled_adapters(
        store,
        registry.all(),
        lambda: model_sha256(resolve_model(settings)),
        lambda: tokenizer if tokenizer is not None else load_tokenizer(resolve_model(settings)),
    )


def load_registry(settings: Settings) -> PersonaRegistry:
    """Builtin personas, the user's folder (`personas_dir`, default `<data_dir>/personas`), entry points."""
    return PersonaRegistry.from_settings(settings)


def load_backend(settings: Settings, *, allow_pull: bool = False) -> LocalBackend:
    """The local backend on the configured model; pulls the default model first when allowed."""
    if (
        allow_pull
        and settings.model.path is None
        and settings.model.auto_pull
        and not (default_model_dir(settings) / MARKER).is_file()
    ):
        log.warning("the default model is not pulled yet; pulling it once now")
        pull_default_model(settings)
    return LocalBackend(resolve_model(settings), settings.model.device, settings.model.dtype)
