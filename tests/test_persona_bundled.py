"""Adapters shipped with a persona: registered and activated on first use, skipped on another base model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from bot.store import Store
from personas.bundled import install_bundled_adapters
from personas.registry import Persona, PersonaRegistry
from personas.versions import active_version, deactivate
from tests.test_persona_versions import BASE_SHA, OTHER_SHA, make_adapter
from tests.tiny import byte_level_tokenizer

PERSONA = 'name = "Saltbeard"\nsystem_prompt = "Arr."\ndialogues = []\n'


def persona_with_adapter(root: Path, base_sha: str = BASE_SHA) -> Persona:
    folder = root / "pirate"
    folder.mkdir(parents=True)
    (folder / "persona.toml").write_text(PERSONA)
    make_adapter(folder / "adapter", "pirate", "bundled-v1", base_sha=base_sha)
    return PersonaRegistry.discover(root, entry_points=False, builtin=False).get("pirate")


async def install(store: Store, persona: Persona) -> list[str]:
    tokenizer: Any = byte_level_tokenizer()
    return await install_bundled_adapters(store, [persona], lambda: BASE_SHA, lambda: tokenizer)


async def test_first_use_registers_and_activates_the_bundled_adapter(
    sqlite_store: Store, tmp_path: Path
) -> None:
    persona = persona_with_adapter(tmp_path)
    assert await install(sqlite_store, persona) == ["pirate@bundled-v1"]
    async with sqlite_store.transaction() as session:
        active = await active_version(session, "pirate")
    assert active is not None and Path(active.path) == (persona.folder / "adapter").resolve()
    assert active.heldout_loss == 1.5
    # Not first use any more: an operator's deactivation stands.
    await deactivate(sqlite_store, "pirate")
    assert await install(sqlite_store, persona) == []
    async with sqlite_store.transaction() as session:
        assert await active_version(session, "pirate") is None


async def test_another_base_model_runs_without_the_adapter_with_one_warning(
    sqlite_store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    persona = persona_with_adapter(tmp_path, base_sha=OTHER_SHA)
    with caplog.at_level(logging.WARNING, logger="personas.bundled"):
        assert await install(sqlite_store, persona) == []
    lines = [r.getMessage() for r in caplog.records if r.name == "personas.bundled"]
    assert len(lines) == 1 and "answering without it" in lines[0] and OTHER_SHA[:12] in lines[0]
    async with sqlite_store.transaction() as session:
        assert await active_version(session, "pirate") is None


def test_the_builtin_bundled_adapters_are_small_and_pinned() -> None:
    from personas.bundled import bundled_adapter
    from personas.manifest import read_manifest

    registry = PersonaRegistry.discover(None, entry_points=False, builtin=True)
    shipped = [p.slug for p in registry.all() if bundled_adapter(p) is not None]
    assert "pirate" in shipped
    for slug in shipped:
        folder = bundled_adapter(registry.get(slug))
        assert folder is not None
        assert sum(p.stat().st_size for p in folder.iterdir()) <= 10_000_000
        manifest = read_manifest(folder)
        assert manifest.persona == slug and len(manifest.base_model_sha256) == 64


async def test_chat_says_when_a_persona_with_dialogues_has_no_trained_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import io

    from bot.chat import run_chat
    from bot.config import load_settings
    from tests.fakes.backend import ScriptedBackend

    folder = tmp_path / "data" / "personas" / "sage"
    folder.mkdir(parents=True)
    (folder / "persona.toml").write_text('name = "Sage"\nsystem_prompt = "Be wise."\n')
    (folder / "dialogues.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Greetings."}]}\n'
    )
    monkeypatch.setattr("bot.chat.load_backend", lambda settings, allow_pull: ScriptedBackend())
    with caplog.at_level(logging.WARNING, logger="bot.runtime"):
        await run_chat(load_settings(), persona="sage", stdin=io.StringIO("hello\n"), stdout=io.StringIO())
    hints = [r.getMessage() for r in caplog.records if "no trained adapter" in r.getMessage()]
    sage = [h for h in hints if h.startswith("persona sage has dialogues")]
    assert len(sage) == 1 and "`personabot train sage --activate`" in sage[0]
    assert not any("persona assistant" in h for h in hints)  # no dialogues: nothing to train
