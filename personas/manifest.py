"""`manifest.json`: what a trained adapter is and what it was trained on.

The trainer writes one next to every adapter, at `<data_dir>/loras/<persona>/<version>/manifest.json`,
with `write_manifest`; the registry reads it with `read_manifest` before it activates that version. A
manifest may carry more keys than listed here (they are kept), so the trainer can add to it freely.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bot.errors import PersonaError
from bot.files import atomic_write_text
from personas.spec import SLUG_PATTERN, describe_errors, display_path

if TYPE_CHECKING:
    from bot.config import Settings

MANIFEST_NAME = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What the trainer writes beside them (trainer.report), read back by the web console.
LOSS_CURVE = "loss_curve.png"
REPORT = "report.md"
HISTORY = "training.json"  # loss per step, held-out losses, before/after replies, as data
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
# Held-out metrics the CLI shows; the trainer may record more.
HELDOUT_LOSS_AFTER = "heldout_loss_after"
HELDOUT_LOSS_BEFORE = "heldout_loss_before"


class AdapterManifest(BaseModel):
    """The contents of `manifest.json` (format 1)."""

    model_config = ConfigDict(extra="allow")

    format: int = Field(default=1, description="Manifest format; readers refuse a newer one.")
    persona: str = Field(description="Slug of the persona the adapter was trained for.")
    version: str = Field(description="The version's folder name.")
    base_model: str = Field(description="Base model name (`model.name` in config).")
    base_model_sha256: str = Field(description="bot.basemodel.model_sha256 of the base weights.")
    template: str = Field(description="Chat template the dialogues were rendered with.")
    dataset_sha256: str = Field(description="sha256 over the training dialogue files.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(
        default_factory=dict, description="Held-out loss before/after (`heldout_loss_after`), perplexity, ..."
    )
    started_at: datetime
    finished_at: datetime
    tokenizer_size: int | None = Field(default=None, ge=1, description="len(tokenizer) when trained.")
    added_tokens: list[str] = Field(
        default_factory=list,
        description="Tokens the adapter needs beyond the base tokenizer's (usually none).",
    )
    files: dict[str, str] = Field(
        default_factory=dict, description="sha256 of each adapter file, checked before activation."
    )
    dataset_files: list[str] = Field(default_factory=list, description="The dialogue files trained on.")
    system_prompt: str = Field(default="", description="The persona's system prompt when trained (raw).")

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value > 1:
            raise ValueError(f"format {value} is newer than this personabot understands (1)")
        return value

    @field_validator("persona")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not re.match(SLUG_PATTERN, value):
            raise ValueError("not a persona slug")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        check_version_name(value)
        return value

    @field_validator("base_model_sha256", "dataset_sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError("must be 64 lowercase hex digits")
        return value

    @property
    def heldout_loss(self) -> float | None:
        value = self.metrics.get(HELDOUT_LOSS_AFTER)
        return float(value) if isinstance(value, int | float) else None


def check_version_name(version: str) -> str:
    """A version is a folder name: letters, digits, '.', '_' and '-' (not '.' or '..')."""
    if not re.match(VERSION_PATTERN, version) or set(version) == {"."}:
        raise PersonaError(f"version {version!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return version


def adapter_dir(settings: Settings, persona: str, version: str) -> Path:
    """`<data_dir>/loras/<persona>/<version>`."""
    return settings.loras_dir / persona / check_version_name(version)


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> AdapterManifest:
    """The folder's `manifest.json`; a `PersonaError` naming the file (and field) when it is unusable."""
    path = folder / MANIFEST_NAME
    shown = display_path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PersonaError(f"{shown}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaError(f"{shown}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise PersonaError(f"{shown}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PersonaError(f"{shown}: expected a JSON object")
    try:
        return AdapterManifest.model_validate(data)
    except ValidationError as exc:
        raise PersonaError(describe_errors(exc, shown)) from None


def write_manifest(folder: Path, manifest: AdapterManifest, *, hash_files: bool = True) -> Path:
    """Write `manifest.json` atomically; with `hash_files`, record the sha256 of the adapter files first."""
    if hash_files:
        files = dict(manifest.files)
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            if (folder / name).is_file():
                files[name] = sha256_of(folder / name)
        manifest = manifest.model_copy(update={"files": files})
    path = folder / MANIFEST_NAME
    return atomic_write_text(
        path, json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
    )
