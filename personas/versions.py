"""Adapter versions: which trained LoRA each persona answers with.

Versions are rows of `adapter_versions` in the store; at most one per persona is active. The trainer
registers a version when it finishes (`register_version`); `activate` checks the adapter's files against
the configured base model and flips the active row in one transaction; workers poll `active_versions`
and load the new adapter at their next batch, without a restart.

`activate` refuses, saying why, when:
- the manifest's base-model sha256 differs from the configured base model's;
- the adapter needs tokens the base tokenizer lacks (added tokens, a resized embedding, token indices
  past the vocabulary);
- a file is missing or corrupt (`manifest.json`, `adapter_config.json`, `adapter_model.safetensors`).

`rollback` undoes the newest activation: the version active before the current one is active again.
The version rolled back from is marked (`rolled_back_at`, kept in the row's metrics so the schema stays
as it is) until it is activated again, so the console can tell it from a version never activated.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.errors import PersonaError
from bot.events import utcnow
from bot.store import Store
from bot.store.engine import dialect_of
from bot.store.models import AdapterVersion
from personas.manifest import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    HELDOUT_LOSS_AFTER,
    AdapterManifest,
    adapter_dir,
    check_version_name,
    read_manifest,
    sha256_of,
)
from personas.spec import display_path

if TYPE_CHECKING:
    from bot.config import Settings

# Kept in `adapter_versions.metrics` beside the trainer's metrics; `VersionInfo.of` takes it out.
ROLLED_BACK_AT = "rolled_back_at"


class AdapterRefused(PersonaError):
    """An adapter version that must not be activated; the message says why."""


@dataclass(frozen=True)
class VersionInfo:
    """One registered adapter version."""

    persona: str
    version: str
    path: str
    base_model_sha256: str
    metrics: dict[str, Any]
    is_active: bool
    created_at: datetime
    activated_at: datetime | None
    rolled_back_at: str | None = None  # ISO time of the rollback away from it, until activated again

    @property
    def heldout_loss(self) -> float | None:
        value = self.metrics.get(HELDOUT_LOSS_AFTER)
        return float(value) if isinstance(value, int | float) else None

    @classmethod
    def of(cls, row: AdapterVersion) -> VersionInfo:
        metrics = dict(row.metrics or {})
        rolled_back = metrics.pop(ROLLED_BACK_AT, None)
        return cls(
            persona=row.persona,
            version=row.version,
            path=row.path,
            base_model_sha256=row.base_model_sha256,
            metrics=metrics,
            is_active=row.is_active,
            created_at=row.created_at,
            activated_at=row.activated_at,
            rolled_back_at=str(rolled_back) if rolled_back else None,
        )


@asynccontextmanager
async def _session(target: Store | AsyncSession) -> AsyncIterator[AsyncSession]:
    """The caller's session (its transaction), or a new transaction on the store."""
    if isinstance(target, AsyncSession):
        yield target
        return
    async with target.transaction() as session:
        yield session


# -- registering and reading ------------------------------------------------------------------------


async def register_version(
    session: AsyncSession,
    persona: str,
    version: str,
    path: str | Path,
    base_model_sha256: str,
    metrics: dict[str, Any],
) -> None:
    """Record a trained adapter (inactive). Registering a version again updates its row in place."""
    check_version_name(version)
    row = (
        await session.execute(
            select(AdapterVersion).where(AdapterVersion.persona == persona, AdapterVersion.version == version)
        )
    ).scalar_one_or_none()
    if row is None:
        session.add(
            AdapterVersion(
                persona=persona,
                version=version,
                path=str(path),
                base_model_sha256=base_model_sha256,
                metrics=dict(metrics),
                is_active=False,
                created_at=utcnow(),
            )
        )
    else:
        row.path = str(path)
        row.base_model_sha256 = base_model_sha256
        row.metrics = dict(metrics)
    await session.flush()


async def register_folder(session: AsyncSession, folder: Path) -> VersionInfo:
    """Register the adapter in `folder` from its `manifest.json` (for versions trained elsewhere)."""
    manifest = read_manifest(folder)
    await register_version(
        session,
        manifest.persona,
        manifest.version,
        folder.resolve(),
        manifest.base_model_sha256,
        manifest.metrics,
    )
    found = await get_version(session, manifest.persona, manifest.version)
    assert found is not None
    return found


async def get_version(session: AsyncSession, persona: str, version: str) -> VersionInfo | None:
    row = (
        await session.execute(
            select(AdapterVersion).where(AdapterVersion.persona == persona, AdapterVersion.version == version)
        )
    ).scalar_one_or_none()
    return VersionInfo.of(row) if row is not None else None


async def list_versions(session: AsyncSession, persona: str | None = None) -> list[VersionInfo]:
    """Registered versions, oldest first (of one persona, or of all)."""
    query = select(AdapterVersion).order_by(
        AdapterVersion.persona, AdapterVersion.created_at, AdapterVersion.id
    )
    if persona is not None:
        query = query.where(AdapterVersion.persona == persona)
    return [VersionInfo.of(row) for row in (await session.execute(query)).scalars()]


async def active_versions(session: AsyncSession) -> dict[str, tuple[str, str]]:
    """`{persona: (version, adapter folder)}` for every persona with an active adapter.

    One small query: workers call it before each batch to pick up activations without a restart.
    """
    rows = await session.execute(_ACTIVE)
    return {persona: (version, path) for persona, version, path in rows}


# Built once: a worker runs it before every batch, and building an ORM statement costs more than it.
_ACTIVE = select(AdapterVersion.persona, AdapterVersion.version, AdapterVersion.path).where(
    AdapterVersion.is_active.is_(True)
)


async def pinned_versions(
    session: AsyncSession, asked: Iterable[tuple[str, str]], active: dict[str, tuple[str, str]]
) -> dict[str, str]:
    """`{"persona@version": adapter folder}` of the (persona, version) pairs requests pin (the API's
    `slug@version`) that are registered and not active; an active one is loaded anyway."""
    pinned: dict[str, str] = {}
    for persona, version in sorted(set(asked)):
        if active.get(persona, ("", ""))[0] == version:
            continue
        info = await get_version(session, persona, version)
        if info is not None:
            pinned[f"{persona}@{version}"] = info.path
    return pinned


async def active_version(session: AsyncSession, persona: str) -> VersionInfo | None:
    row = (
        await session.execute(
            select(AdapterVersion).where(
                AdapterVersion.persona == persona, AdapterVersion.is_active.is_(True)
            )
        )
    ).scalar_one_or_none()
    return VersionInfo.of(row) if row is not None else None


# -- checking an adapter's files --------------------------------------------------------------------

# Tensors whose rows (or columns) run over the vocabulary: a full embedding / output layer saved with
# the adapter (`modules_to_save`, resized vocab), LoRA on the embedding, or peft trainable tokens.
_VOCAB_MODULE = re.compile(r"(embed_tokens|lm_head|wte|embed_in|embed_out|word_embeddings)")


def _vocab_rows(name: str, shape: list[int]) -> int | None:
    if not _VOCAB_MODULE.search(name) or len(shape) != 2:
        return None
    if "lora_embedding_A" in name:  # (r, num_embeddings)
        return shape[1]
    if "lora_A" in name or "lora_embedding_B" in name or "trainable_tokens_delta" in name:
        return None  # (r, hidden) / (hidden, r) / (n new rows, hidden): no vocabulary dimension
    return shape[0]  # full weight (vocab, hidden) or lm_head lora_B (vocab, r)


def _tokenizer_vocab(tokenizer: Any) -> tuple[dict[str, int], int]:
    vocab = dict(tokenizer.get_vocab())
    return vocab, max(len(tokenizer), len(vocab))


def _adapter_tokens(folder: Path) -> dict[str, int | None]:
    """Tokens an adapter folder's own tokenizer files add, with their ids where known."""
    tokens: dict[str, int | None] = {}
    added = folder / "added_tokens.json"
    if added.is_file():
        data = _json_file(added)
        if isinstance(data, dict):
            tokens.update({str(k): int(v) for k, v in data.items() if isinstance(v, int)})
    tok_json = folder / "tokenizer.json"
    if tok_json.is_file():
        data = _json_file(tok_json)
        for item in data.get("added_tokens", []) if isinstance(data, dict) else []:
            if isinstance(item, dict) and "content" in item:
                tokens[str(item["content"])] = item.get("id")
    return tokens


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterRefused(f"{display_path(path)}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRefused(f"{display_path(path)}: corrupt ({exc})") from None


def _token_indices(config: dict[str, Any]) -> list[int]:
    """peft `trainable_token_indices`: a list, or a dict of lists per module."""
    raw = config.get("trainable_token_indices")
    if isinstance(raw, list):
        return [i for i in raw if isinstance(i, int)]
    if isinstance(raw, dict):
        return [i for v in raw.values() if isinstance(v, list) for i in v if isinstance(i, int)]
    return []


def check_adapter(
    folder: Path,
    *,
    base_model_sha256: str,
    tokenizer: Any,
    persona: str | None = None,
    version: str | None = None,
    base_vocab_size: int | None = None,
) -> AdapterManifest:
    """Check that the adapter in `folder` can run on the configured base model; returns its manifest.

    `tokenizer` is the base model's (anything with `get_vocab()` and `len()`); `base_vocab_size` is the
    base model's embedding rows when they exceed the tokenizer (padded vocabularies). Raises
    `AdapterRefused` with the reason.
    """
    where = display_path(folder)
    if not folder.is_dir():
        raise AdapterRefused(f"{where}: adapter folder is missing")
    try:
        manifest = read_manifest(folder)
    except PersonaError as exc:
        raise AdapterRefused(str(exc)) from None
    if persona is not None and manifest.persona != persona:
        raise AdapterRefused(f"{where}: manifest.json says persona {manifest.persona!r}, not {persona!r}")
    if version is not None and manifest.version != version:
        raise AdapterRefused(f"{where}: manifest.json says version {manifest.version!r}, not {version!r}")
    if manifest.base_model_sha256 != base_model_sha256:
        raise AdapterRefused(
            f"{where}: trained on base model {manifest.base_model} (sha256 {manifest.base_model_sha256[:12]}…), "
            f"but the configured base model's sha256 is {base_model_sha256[:12]}…"
        )

    config = _json_file(folder / ADAPTER_CONFIG)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterRefused(f"{display_path(folder / ADAPTER_CONFIG)}: corrupt (no peft_type)")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise AdapterRefused(f"{display_path(weights)}: missing")
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise AdapterRefused(f"{display_path(path)}: missing (listed in manifest.json)")
        if sha256_of(path) != expected:
            raise AdapterRefused(f"{display_path(path)}: corrupt (sha256 differs from manifest.json)")
    shapes = _safetensors_shapes(weights)
    if not shapes:
        raise AdapterRefused(f"{display_path(weights)}: corrupt (holds no tensors)")

    vocab, size = _tokenizer_vocab(tokenizer)
    limit = max(size, base_vocab_size or 0)
    wanted = dict.fromkeys(manifest.added_tokens) | _adapter_tokens(folder)
    missing = [
        tok for tok, tid in wanted.items() if tok not in vocab or (tid is not None and vocab[tok] != tid)
    ]
    if missing:
        shown = ", ".join(repr(t) for t in missing[:5]) + (" …" if len(missing) > 5 else "")
        raise AdapterRefused(f"{where}: needs tokens the base tokenizer does not have: {shown}")
    if manifest.tokenizer_size is not None and manifest.tokenizer_size > limit:
        raise AdapterRefused(
            f"{where}: trained with a {manifest.tokenizer_size}-token vocabulary; the base tokenizer has {size}"
        )
    indices = _token_indices(config)
    if indices and max(indices) >= limit:
        raise AdapterRefused(
            f"{where}: trains token id {max(indices)}, past the base tokenizer's {size} tokens"
        )
    for name, shape in shapes.items():
        rows = _vocab_rows(name, shape)
        if rows is not None and rows > limit:
            raise AdapterRefused(
                f"{where}: tensor {name} covers {rows} tokens (resized vocabulary); "
                f"the base tokenizer has {size}"
            )
    return manifest


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor names and shapes from the header; a truncated or garbled file is refused."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            return {name: list(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterRefused(f"{display_path(path)}: corrupt ({exc})") from None


# -- activating -------------------------------------------------------------------------------------


async def _locked_rows(session: AsyncSession, persona: str) -> list[AdapterVersion]:
    """The persona's versions, locked on PostgreSQL so concurrent activations take turns."""
    query = select(AdapterVersion).where(AdapterVersion.persona == persona).order_by(AdapterVersion.id)
    if dialect_of(session) == "postgresql":
        query = query.with_for_update()
    return list((await session.execute(query)).scalars())


def _unknown(persona: str, version: str, rows: list[AdapterVersion]) -> PersonaError:
    known = ", ".join(r.version for r in rows) or "none registered"
    return PersonaError(f"persona {persona!r} has no adapter version {version!r} (known: {known})")


async def activate(
    target: Store | AsyncSession,
    persona: str,
    version: str,
    *,
    base_model_sha256: str,
    tokenizer: Any,
    base_vocab_size: int | None = None,
) -> VersionInfo:
    """Make `version` the persona's active adapter, after `check_adapter`; one transaction.

    With a session, the change joins the caller's transaction; with a store, it commits on return.
    """
    async with _session(target) as session:
        rows = await _locked_rows(session, persona)
        chosen = next((r for r in rows if r.version == version), None)
        if chosen is None:
            raise _unknown(persona, version, rows)
        check_adapter(
            Path(chosen.path),
            base_model_sha256=base_model_sha256,
            tokenizer=tokenizer,
            persona=persona,
            version=version,
            base_vocab_size=base_vocab_size,
        )
        if chosen.base_model_sha256 and chosen.base_model_sha256 != base_model_sha256:
            # The files match the base model but the row does not: the folder was replaced after
            # registration. Register it again (personabot persona activate does) to accept it.
            raise AdapterRefused(
                f"{persona} {version}: registered for base model sha256 {chosen.base_model_sha256[:12]}…, "
                f"but its manifest and the configured base model say {base_model_sha256[:12]}…"
            )
        now = utcnow()
        await session.execute(
            update(AdapterVersion)
            .where(
                AdapterVersion.persona == persona, AdapterVersion.id != chosen.id, AdapterVersion.is_active
            )
            .values(is_active=False)
        )
        cleared = {k: v for k, v in (chosen.metrics or {}).items() if k != ROLLED_BACK_AT}
        await session.execute(
            update(AdapterVersion)
            .where(AdapterVersion.id == chosen.id)
            .values(is_active=True, activated_at=now, metrics=cleared)
        )
        await session.flush()
        await session.refresh(chosen)
        return VersionInfo.of(chosen)


async def rollback(
    target: Store | AsyncSession,
    persona: str,
    *,
    base_model_sha256: str,
    tokenizer: Any,
    base_vocab_size: int | None = None,
) -> VersionInfo:
    """Reactivate the version that was active before the current one; returns it.

    The current version's activation is undone (its `activated_at` cleared), so rolling back again
    steps further back through earlier activations.
    """
    async with _session(target) as session:
        rows = await _locked_rows(session, persona)
        current = next((r for r in rows if r.is_active), None)
        if current is None:
            raise PersonaError(f"persona {persona!r} has no active adapter version to roll back")
        earlier = [
            r
            for r in rows
            if r.id != current.id
            and r.activated_at is not None
            and (current.activated_at is None or r.activated_at <= current.activated_at)
        ]
        if not earlier:
            raise PersonaError(
                f"persona {persona!r}: no earlier activated version than {current.version!r} to roll back to"
            )
        previous = max(earlier, key=lambda r: (r.activated_at, r.id))
        check_adapter(
            Path(previous.path),
            base_model_sha256=base_model_sha256,
            tokenizer=tokenizer,
            persona=persona,
            version=previous.version,
            base_vocab_size=base_vocab_size,
        )
        marked = {**(current.metrics or {}), ROLLED_BACK_AT: utcnow().isoformat()}
        await session.execute(
            update(AdapterVersion)
            .where(AdapterVersion.id == current.id)
            .values(is_active=False, activated_at=None, metrics=marked)
        )
        await session.execute(
            update(AdapterVersion).where(AdapterVersion.id == previous.id).values(is_active=True)
        )
        await session.flush()
        await session.refresh(previous)
        return VersionInfo.of(previous)


async def deactivate(target: Store | AsyncSession, persona: str) -> VersionInfo | None:
    """Answer with the base model again; returns the version that was active (None when none was)."""
    async with _session(target) as session:
        rows = await _locked_rows(session, persona)
        current = next((r for r in rows if r.is_active), None)
        if current is None:
            return None
        await session.execute(
            update(AdapterVersion).where(AdapterVersion.id == current.id).values(is_active=False)
        )
        await session.flush()
        await session.refresh(current)
        return VersionInfo.of(current)


async def activate_named(
    store: Store, settings: Settings, persona: str, version: str, base: BaseModelFacts
) -> VersionInfo:
    """`personabot persona activate`: activate a version, registering its folder first when it was
    trained (or copied) here but never registered; a refused activation rolls that back with it."""
    async with store.transaction() as session:
        if await get_version(session, persona, version) is None:
            folder = adapter_dir(settings, persona, version)
            if not folder.is_dir():
                registered = {v.version for v in await list_versions(session, persona)}
                trained = {p.parent.name for p in folder.parent.glob("*/manifest.json")}
                known = ", ".join(sorted(registered | trained)) or "none; train one with personabot train"
                raise PersonaError(f"persona {persona!r} has no adapter version {version!r} (known: {known})")
            await register_folder(session, folder)
        return await activate(
            session,
            persona,
            version,
            base_model_sha256=base.sha256,
            tokenizer=base.tokenizer,
            base_vocab_size=base.vocab_size,
        )


@dataclass(frozen=True)
class BaseModelFacts:
    """What `activate` checks an adapter against: the configured base model's fingerprint and vocabulary."""

    sha256: str
    tokenizer: Any
    vocab_size: int | None  # the model's embedding rows (config.json), which may exceed the tokenizer's


def base_model_facts(settings: Settings) -> BaseModelFacts:
    """Fingerprint, tokenizer and vocabulary size of the configured base model (`ModelError` if missing)."""
    from transformers import AutoTokenizer

    from bot.basemodel import model_sha256, resolve_model

    location = resolve_model(settings)
    kwargs = {"gguf_file": location.gguf_file} if location.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(str(location.folder), **kwargs)
    vocab_size = None
    config = location.folder / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("vocab_size")
            vocab_size = int(value) if isinstance(value, int) else None
        except (OSError, json.JSONDecodeError):
            vocab_size = None
    return BaseModelFacts(model_sha256(location), tokenizer, vocab_size)
