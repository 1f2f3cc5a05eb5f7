"""Which adapter `personabot eval` evaluates: a named version, the base model, or the active one."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bot.config import Settings
from bot.errors import PersonaError
from bot.quality.run import EvalTarget


def resolve_target(settings: Settings, slug: str, version: str | None) -> EvalTarget:
    """`version` None: the persona's active adapter (the base model when none is active); "base": the
    base model; else that registered version."""
    from bot.runtime import install_bundled, load_registry, open_store
    from personas.versions import active_version, get_version

    registry = load_registry(settings)
    persona = registry.get(slug)
    if version == "base":
        return EvalTarget(persona)

    async def find() -> tuple[str, str] | None:
        store = await open_store(settings)
        try:
            await install_bundled(settings, store, registry)
            async with store.transaction() as session:
                info = (
                    await active_version(session, slug)
                    if version is None
                    else await get_version(session, slug, version)
                )
        finally:
            await store.close()
        return (info.version, info.path) if info is not None else None

    found = asyncio.run(find())
    if found is None:
        if version is not None:
            raise PersonaError(f"persona {slug!r} has no adapter version {version!r}")
        return EvalTarget(persona)
    return EvalTarget(persona, Path(found[1]), found[0])
