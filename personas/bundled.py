"""Adapters shipped with a persona: `<persona folder>/adapter/` (peft files + `manifest.json`).

On first use (`install_bundled_adapters`, called when chat, run, worker or eval start) a bundled adapter
is registered in the store and activated, so a bundled persona speaks in character right after
`pip install`. "First use" means the persona has no registered version yet: once an operator trains,
activates, rolls back or deactivates versions, the store decides and the bundled adapter is left alone.

The manifest pins the base model's sha256. When the configured base model differs, the persona runs on
the base model alone and one warning line says why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from bot.errors import PersonabotError
from bot.store import Store
from personas.manifest import MANIFEST_NAME, read_manifest
from personas.registry import Persona

log = logging.getLogger(__name__)

BUNDLED_FOLDER = "adapter"


def bundled_adapter(persona: Persona) -> Path | None:
    """The persona's shipped adapter folder, if it has one."""
    folder = persona.folder / BUNDLED_FOLDER
    return folder if (folder / MANIFEST_NAME).is_file() else None


async def install_bundled_adapters(
    store: Store, personas: Iterable[Persona], base_sha256: Callable[[], str], tokenizer: Callable[[], object]
) -> list[str]:
    """Register and activate every bundled adapter whose persona has no version yet; returns
    `persona@version` of each one activated. `base_sha256` and `tokenizer` are called only if needed."""
    from personas.versions import activate, list_versions, register_version

    installed = []
    for persona in personas:
        folder = bundled_adapter(persona)
        if folder is None:
            continue
        async with store.transaction() as session:
            if await list_versions(session, persona.slug):
                continue
        try:
            manifest = read_manifest(folder)
            sha = base_sha256()
            if manifest.base_model_sha256 != sha:
                log.warning(
                    "persona %s: its bundled adapter was trained on base model sha256 %s…, the configured "
                    "model is %s…; answering without it",
                    persona.slug,
                    manifest.base_model_sha256[:12],
                    sha[:12],
                )
                continue
            async with store.transaction() as session:
                await register_version(
                    session, persona.slug, manifest.version, folder.resolve(), sha, manifest.metrics
                )
                await activate(
                    session, persona.slug, manifest.version, base_model_sha256=sha, tokenizer=tokenizer()
                )
        except PersonabotError as exc:  # a damaged install: say so, and answer without the adapter
            log.warning("persona %s: bundled adapter not used: %s", persona.slug, exc)
            continue
        installed.append(f"{persona.slug}@{manifest.version}")
        log.info("persona %s: activated its bundled adapter %s", persona.slug, manifest.version)
    return installed


async def untrained(store: Store, personas: Iterable[Persona]) -> list[Persona]:
    """Personas that have dialogues to train on but no active adapter: they answer with their system
    prompt alone, which a small model rarely keeps in character."""
    from personas.versions import active_versions

    async with store.transaction() as session:
        active = await active_versions(session)
    return [p for p in personas if p.spec.dialogues and p.slug not in active]


def untrained_hint(persona: Persona) -> str:
    return (
        f"persona {persona.slug} has dialogues but no trained adapter: it answers with its system prompt "
        f"alone and may not sound like itself; `personabot train {persona.slug} --activate` trains one "
        "(10-15 min on 2 CPU cores)"
    )
