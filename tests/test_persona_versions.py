"""Adapter versions in the store: register, activate (with its refusals), rollback, worker polling."""

from __future__ import annotations

import asyncio
import json
import shutil
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from bot.errors import PersonaError
from bot.store import Store
from bot.store.models import AdapterVersion
from personas.manifest import ADAPTER_WEIGHTS, AdapterManifest, read_manifest, write_manifest
from personas.versions import (
    AdapterRefused,
    activate,
    active_version,
    active_versions,
    check_adapter,
    deactivate,
    list_versions,
    register_folder,
    register_version,
    rollback,
)
from tests.tiny import byte_level_tokenizer, tiny_llama

BASE_SHA = "b" * 64
OTHER_SHA = "c" * 64


@cache
def _adapter_files(kind: str) -> dict[str, bytes]:
    """The files peft writes for a LoRA on the tiny model (built once per kind, then copied)."""
    import tempfile

    from peft import LoraConfig, get_peft_model

    tokenizer = byte_level_tokenizer()
    model = tiny_llama(tokenizer)
    options: dict[str, Any] = {}
    if kind in ("resized", "token_indices"):
        model.resize_token_embeddings(len(tokenizer) + 8, mean_resizing=False)
    if kind == "token_indices":
        options["trainable_token_indices"] = [5, len(tokenizer) + 3]
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **options)
    )
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp, save_embedding_layers=kind == "resized")
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def make_adapter(
    folder: Path,
    persona: str = "pirate",
    version: str | None = None,
    *,
    base_sha: str = BASE_SHA,
    kind: str = "plain",
    loss: float = 1.5,
    hash_files: bool = True,
    **manifest_fields: Any,
) -> Path:
    """A trained-looking adapter folder: real peft files plus the trainer's manifest.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in _adapter_files(kind).items():
        (folder / name).write_bytes(content)
    now = datetime.now(UTC)
    manifest = AdapterManifest(
        persona=persona,
        version=version or folder.name,
        base_model="tiny-llama",
        base_model_sha256=base_sha,
        template="model",
        dataset_sha256="d" * 64,
        hyperparameters={"r": 4, "alpha": 8, "epochs": 1},
        metrics={"heldout_loss_before": loss * 1.5, "heldout_loss_after": loss},
        started_at=now,
        finished_at=now,
        **{"tokenizer_size": len(byte_level_tokenizer()), **manifest_fields},
    )
    write_manifest(folder, manifest, hash_files=hash_files)
    return folder


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return byte_level_tokenizer()


async def add(store: Store, folder: Path) -> None:
    async with store.transaction() as s:
        await register_folder(s, folder)


async def state(store: Store, persona: str = "pirate") -> dict[str, bool]:
    async with store.transaction() as s:
        return {v.version: v.is_active for v in await list_versions(s, persona)}


async def test_register_then_activate_exactly_one(store: Store, tmp_path: Path, tokenizer: Any) -> None:
    for version, loss in (("v1", 2.0), ("v2", 1.2)):
        await add(store, make_adapter(tmp_path / "pirate" / version, loss=loss))
    assert await state(store) == {"v1": False, "v2": False}

    info = await activate(store, "pirate", "v1", base_model_sha256=BASE_SHA, tokenizer=tokenizer)
    assert info.is_active and info.version == "v1" and info.heldout_loss == 2.0
    assert info.activated_at is not None
    await activate(store, "pirate", "v2", base_model_sha256=BASE_SHA, tokenizer=tokenizer)
    assert await state(store) == {"v1": False, "v2": True}
    async with store.transaction() as s:
        assert await active_versions(s) == {"pirate": ("v2", str((tmp_path / "pirate" / "v2").resolve()))}
        assert (await active_version(s, "pirate")).heldout_loss == 1.2


async def test_register_version_directly_and_again(store: Store, tmp_path: Path, tokenizer: Any) -> None:
    folder = make_adapter(tmp_path / "v1")
    async with store.transaction() as s:
        await register_version(s, "pirate", "v1", folder, BASE_SHA, {"heldout_loss_after": 3.0})
    async with store.transaction() as s:
        await register_version(s, "pirate", "v1", folder, BASE_SHA, {"heldout_loss_after": 2.5})
    async with store.transaction() as s:
        (only,) = await list_versions(s, "pirate")
    assert only.heldout_loss == 2.5 and only.path == str(folder)


async def test_personas_are_independent(store: Store, tmp_path: Path, tokenizer: Any) -> None:
    await add(store, make_adapter(tmp_path / "pirate" / "v1"))
    await add(store, make_adapter(tmp_path / "poet" / "v1", persona="poet"))
    await activate(store, "pirate", "v1", base_model_sha256=BASE_SHA, tokenizer=tokenizer)
    await activate(store, "poet", "v1", base_model_sha256=BASE_SHA, tokenizer=tokenizer)
    async with store.transaction() as s:
        assert set(await active_versions(s)) == {"pirate", "poet"}
    await deactivate(store, "poet")
    async with store.transaction() as s:
        assert set(await active_versions(s)) == {"pirate"}


async def test_rollback_steps_back_through_activations(store: Store, tmp_path: Path, tokenizer: Any) -> None:
    for version in ("v1", "v2", "v3"):
        await add(store, make_adapter(tmp_path / version))
    kw = {"base_model_sha256": BASE_SHA, "tokenizer": tokenizer}
    with pytest.raises(PersonaError, match="has no active adapter version to roll back"):
        await rollback(store, "pirate", **kw)
    for version in ("v1", "v2", "v3"):
        await activate(store, "pirate", version, **kw)
    assert (await rollback(store, "pirate", **kw)).version == "v2"
    assert (await rollback(store, "pirate", **kw)).version == "v1"
    with pytest.raises(PersonaError, match="no earlier activated version than 'v1'"):
        await rollback(store, "pirate", **kw)
    assert await state(store) == {"v1": True, "v2": False, "v3": False}
    # Activating v3 again, then rolling back, returns to v1: the version active just before it.
    await activate(store, "pirate", "v3", **kw)
    assert (await rollback(store, "pirate", **kw)).version == "v1"


def _break(kind: str, folder: Path) -> None:
    if kind == "no manifest":
        (folder / "manifest.json").unlink()
    elif kind == "manifest not json":
        (folder / "manifest.json").write_text("{ nope")
    elif kind == "manifest bad field":
        data = json.loads((folder / "manifest.json").read_text())
        data["base_model_sha256"] = "xyz"
        (folder / "manifest.json").write_text(json.dumps(data))
    elif kind == "no adapter_config":
        (folder / "adapter_config.json").unlink()
    elif kind == "adapter_config corrupt":
        (folder / "adapter_config.json").write_text("[1, 2")
    elif kind == "no weights":
        (folder / ADAPTER_WEIGHTS).unlink()
    elif kind == "weights changed":
        data = bytearray((folder / ADAPTER_WEIGHTS).read_bytes())
        data[-1] ^= 0xFF
        (folder / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    elif kind == "folder gone":
        shutil.rmtree(folder)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("no manifest", "manifest.json: missing"),
        ("manifest not json", "manifest.json: not valid JSON"),
        ("manifest bad field", "manifest.json: base_model_sha256: must be 64 lowercase hex digits"),
        ("no adapter_config", "adapter_config.json: missing"),
        ("adapter_config corrupt", "adapter_config.json: corrupt"),
        ("no weights", "adapter_model.safetensors: missing"),
        ("weights changed", "adapter_model.safetensors: corrupt (sha256 differs from manifest.json)"),
        ("folder gone", "adapter folder is missing"),
    ],
)
async def test_missing_or_corrupt_files_are_refused_and_nothing_changes(
    store: Store, tmp_path: Path, tokenizer: Any, kind: str, reason: str
) -> None:
    kw = {"base_model_sha256": BASE_SHA, "tokenizer": tokenizer}
    await add(store, make_adapter(tmp_path / "v1"))
    await add(store, make_adapter(tmp_path / "v2"))
    await activate(store, "pirate", "v1", **kw)
    _break(kind, tmp_path / "v2")
    with pytest.raises(AdapterRefused) as info:
        await activate(store, "pirate", "v2", **kw)
    assert reason in str(info.value)
    assert await state(store) == {"v1": True, "v2": False}


def test_truncated_weights_without_recorded_hashes_are_refused(tmp_path: Path, tokenizer: Any) -> None:
    folder = make_adapter(tmp_path / "v1", hash_files=False)
    assert read_manifest(folder).files == {}
    weights = folder / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(AdapterRefused, match=r"adapter_model.safetensors: corrupt \(.*incomplete metadata"):
        check_adapter(folder, base_model_sha256=BASE_SHA, tokenizer=tokenizer)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(AdapterRefused, match=r"adapter_model.safetensors: corrupt"):
        check_adapter(folder, base_model_sha256=BASE_SHA, tokenizer=tokenizer)


async def test_another_base_model_is_refused(store: Store, tmp_path: Path, tokenizer: Any) -> None:
    await add(store, make_adapter(tmp_path / "v1", base_sha=OTHER_SHA))
    with pytest.raises(AdapterRefused) as info:
        await activate(store, "pirate", "v1", base_model_sha256=BASE_SHA, tokenizer=tokenizer)
    assert str(info.value).endswith(
        "v1: trained on base model tiny-llama (sha256 cccccccccccc…), "
        "but the configured base model's sha256 is bbbbbbbbbbbb…"
    )
    assert await state(store) == {"v1": False}


async def test_a_folder_replaced_after_registration_is_refused(
    store: Store, tmp_path: Path, tokenizer: Any
) -> None:
    folder = make_adapter(tmp_path / "v1")
    async with store.transaction() as s:
        await register_version(s, "pirate", "v1", folder, OTHER_SHA, {})
    with pytest.raises(AdapterRefused, match="registered for base model sha256 cccccccccccc…"):
        await activate(store, "pirate", "v1", base_model_sha256=BASE_SHA, tokenizer=tokenizer)


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("resized", "tensor base_model.model.lm_head.weight covers 608 tokens (resized vocabulary)"),
        ("token_indices", "trains token id 603, past the base tokenizer's 600 tokens"),
        ("manifest_tokens", "needs tokens the base tokenizer does not have: '<|pirate|>'"),
        ("added_tokens_json", "needs tokens the base tokenizer does not have: '<|treasure|>'"),
        ("tokenizer_size", "trained with a 700-token vocabulary; the base tokenizer has 600"),
    ],
)
def test_tokens_the_base_tokenizer_lacks_are_refused(
    tmp_path: Path, tokenizer: Any, setup: str, reason: str
) -> None:
    folder = tmp_path / "v1"
    if setup in ("resized", "token_indices"):
        make_adapter(folder, kind=setup)
    elif setup == "manifest_tokens":
        make_adapter(folder, added_tokens=["<|im_end|>", "<|pirate|>"])
    elif setup == "added_tokens_json":
        make_adapter(folder)
        (folder / "added_tokens.json").write_text(json.dumps({"<|treasure|>": 600}))
    else:
        make_adapter(folder, tokenizer_size=700)
    with pytest.raises(AdapterRefused) as info:
        check_adapter(folder, base_model_sha256=BASE_SHA, tokenizer=tokenizer)
    assert reason in str(info.value)


def test_a_padded_base_vocabulary_is_not_mistaken_for_new_tokens(tmp_path: Path, tokenizer: Any) -> None:
    folder = make_adapter(tmp_path / "v1", kind="resized")
    # The base model's own embedding has 608 rows (padded past the tokenizer): the adapter fits it.
    check_adapter(folder, base_model_sha256=BASE_SHA, tokenizer=tokenizer, base_vocab_size=608)
    # Tokens the base tokenizer does have are fine too.
    check_adapter(
        make_adapter(tmp_path / "v2", added_tokens=["<|im_end|>"]),
        base_model_sha256=BASE_SHA,
        tokenizer=tokenizer,
    )


async def test_unknown_version_lists_the_known_ones(store: Store, tmp_path: Path, tokenizer: Any) -> None:
    await add(store, make_adapter(tmp_path / "v1"))
    with pytest.raises(PersonaError, match=r"persona 'pirate' has no adapter version 'v9' \(known: v1\)"):
        await activate(store, "pirate", "v9", base_model_sha256=BASE_SHA, tokenizer=tokenizer)


async def test_activation_inside_a_failed_transaction_changes_nothing(
    store: Store, tmp_path: Path, tokenizer: Any
) -> None:
    await add(store, make_adapter(tmp_path / "v1"))
    await add(store, make_adapter(tmp_path / "v2"))
    await activate(store, "pirate", "v1", base_model_sha256=BASE_SHA, tokenizer=tokenizer)
    with pytest.raises(RuntimeError):
        async with store.transaction() as s:
            await activate(s, "pirate", "v2", base_model_sha256=BASE_SHA, tokenizer=tokenizer)
            raise RuntimeError("crash after activating, before commit")
    assert await state(store) == {"v1": True, "v2": False}


async def test_a_running_worker_sees_activations_without_restart(
    store: Store, tmp_path: Path, tokenizer: Any
) -> None:
    """A worker polls `active_versions` on its own connection; an admin activates on another."""
    worker = Store(store.url)
    try:
        await add(store, make_adapter(tmp_path / "v1"))
        await add(store, make_adapter(tmp_path / "v2"))
        async with worker.transaction() as s:
            assert await active_versions(s) == {}
        await activate(store, "pirate", "v1", base_model_sha256=BASE_SHA, tokenizer=tokenizer)
        async with worker.transaction() as s:
            assert (await active_versions(s))["pirate"][0] == "v1"
        await activate(store, "pirate", "v2", base_model_sha256=BASE_SHA, tokenizer=tokenizer)
        async with worker.transaction() as s:
            assert (await active_versions(s))["pirate"][0] == "v2"
    finally:
        await worker.close()


async def test_concurrent_activations_leave_exactly_one_active(
    store: Store, tmp_path: Path, tokenizer: Any
) -> None:
    versions = [f"v{i}" for i in range(4)]
    for version in versions:
        await add(store, make_adapter(tmp_path / version))
    stores = [Store(store.url) for _ in versions]
    try:
        results = await asyncio.gather(
            *(
                activate(s, "pirate", v, base_model_sha256=BASE_SHA, tokenizer=tokenizer)
                for s, v in zip(stores, versions, strict=True)
            ),
            return_exceptions=True,
        )
    finally:
        for s in stores:
            await s.close()
    assert any(not isinstance(r, BaseException) for r in results), results
    async with store.transaction() as s:
        active = (
            (await s.execute(select(AdapterVersion.version).where(AdapterVersion.is_active.is_(True))))
            .scalars()
            .all()
        )
    assert len(active) == 1
