"""`persona.toml`: what a persona is, validated with pydantic.

A persona folder holds `persona.toml`, its dialogue files and optionally `plugin.py`. Errors name the file
and the field: `personas/pirate/persona.toml: sampling.top_p: must be in (0, 1]`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bot.errors import PersonaError

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sampling(_Strict):
    temperature: float = Field(default=0.7, ge=0.0, le=5.0, description="0 means greedy decoding.")
    top_p: float = Field(default=0.9, description="Nucleus sampling mass, in (0, 1].")
    top_k: int = Field(default=0, ge=0, description="0 turns top-k off.")
    repetition_penalty: float = Field(default=1.1, gt=0.0)
    max_new_tokens: int = Field(default=256, ge=1, le=32768)

    @field_validator("top_p")
    @classmethod
    def _top_p_range(cls, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise ValueError("must be in (0, 1]")
        return value


class Triggers(_Strict):
    """When this persona answers without being addressed by name."""

    direct_messages: bool = True
    mentions: bool = True
    replies: bool = True
    bound_channels: bool = Field(default=True, description="Every message in channels bound to it.")
    name: bool = Field(default=True, description="Messages that start with or @-mention its slug or name.")
    keywords: list[str] = Field(default_factory=list)


class ScheduledPost(_Strict):
    cron: str = Field(description="Five-field crontab expression, e.g. '0 9 * * *'.")
    prompt: str
    timezone: str = "UTC"
    channels: list[str] = Field(
        default_factory=list, description="`platform:id` channels; empty means the channels bound to it."
    )

    @field_validator("cron")
    @classmethod
    def _parse_cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"invalid cron expression {value!r}: {exc}") from None
        return value


class LoraSettings(_Strict):
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


class TrainingSettings(_Strict):
    epochs: float = Field(default=3.0, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=8, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    max_seq_len: int = Field(default=512, ge=16)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    heldout_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 0
    packing: bool = True


class PersonaSpec(_Strict):
    slug: str = Field(pattern=SLUG_PATTERN)
    name: str = Field(min_length=1, max_length=128, description="Display name.")
    description: str = ""
    system_prompt: str = ""
    greeting: str = ""
    template: str = Field(
        default="model", description="'model' (the tokenizer's own chat template), 'llama2' or 'chatml'."
    )
    context_window: int | None = Field(default=None, ge=64, description="Unset: the model's own.")
    sampling: Sampling = Field(default_factory=Sampling)
    triggers: Triggers = Field(default_factory=Triggers)
    schedule: list[ScheduledPost] = Field(default_factory=list)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    dialogues: list[str] = Field(default_factory=lambda: ["dialogues.jsonl"], description="Relative paths.")
    style_check: Literal["pirate", "haiku"] | None = Field(
        default=None, description="Automatic style score used by `personabot train` reports."
    )

    @model_validator(mode="after")
    def _context_fits_reply(self) -> PersonaSpec:
        if self.context_window is not None and self.sampling.max_new_tokens >= self.context_window:
            raise ValueError("sampling.max_new_tokens must be smaller than context_window")
        return self


def load_spec(path: Path, *, check_files: bool = True) -> PersonaSpec:
    """Read and validate one `persona.toml`; every problem is a `PersonaError` naming file and field."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PersonaError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PersonaError(f"{path}: invalid TOML: {exc}") from None
    data.setdefault("slug", path.parent.name)
    try:
        spec = PersonaSpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            key = ".".join(str(p) for p in err["loc"]) or "(root)"
            message = re.sub(r"^Value error, ", "", err["msg"])
            problems.append(f"{path}: {key}: {message}")
        raise PersonaError("; ".join(problems)) from None
    if check_files:
        for index, rel in enumerate(spec.dialogues):
            if not (path.parent / rel).is_file():
                raise PersonaError(f"{path}: dialogues.{index}: file not found: {path.parent / rel}")
    return spec
