"""`persona.toml`: what a persona is, validated with pydantic.

A persona folder holds `persona.toml`, its dialogue files and optionally `plugin.py`. Errors name the file
and the field: `personas/pirate/persona.toml: sampling.top_p: must be in (0, 1]`.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bot.errors import PersonaError

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
CHANNEL_KEY = re.compile(r"^[a-z][a-z0-9_]*:[^\s/]+(/\S+)?$")
# The chat templates bot.prompting renders; a typo is caught when the persona loads, not at reply time.
TEMPLATES = ("model", "llama2", "chatml")


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

    @field_validator("keywords")
    @classmethod
    def _no_blank_keywords(cls, value: list[str]) -> list[str]:
        if any(not k.strip() for k in value):
            raise ValueError("keywords must not be empty strings")
        return value


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

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("channels")
    @classmethod
    def _channel_keys(cls, value: list[str]) -> list[str]:
        for key in value:
            if not CHANNEL_KEY.match(key):
                raise ValueError(f"{key!r} is not a `platform:id` channel")
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


class CharacterDefinition(_Strict):
    """A character card's definition fields, kept apart so an exported card changes only what you edit.

    The system prompt is built from them in this order; macros (`{{char}}`, `{{user}}`, ...) stay as
    written here and are expanded when the prompt is rendered.
    """

    system_prompt: str = ""
    description: str = ""
    personality: str = ""
    scenario: str = ""
    post_history_instructions: str = ""

    def text(self) -> str:
        # `{{original}}` wraps SillyTavern's global prompt; there is none here, so it is dropped first.
        system = re.sub(r"\{\{\s*original\s*\}\}", "", self.system_prompt, flags=re.I)
        post = re.sub(r"\{\{\s*original\s*\}\}", "", self.post_history_instructions, flags=re.I)
        parts = [
            system.strip(),
            self.description.strip(),
            f"{{{{char}}}}'s personality: {self.personality.strip()}" if self.personality.strip() else "",
            f"Scenario: {self.scenario.strip()}" if self.scenario.strip() else "",
            post.strip(),
        ]
        return "\n\n".join(p for p in parts if p)


class LoreSettings(_Strict):
    """How the persona's lorebooks are read; unset values come from the book, then the defaults."""

    scan_depth: int | None = Field(default=None, ge=0, description="Recent messages scanned for keys (2).")
    token_budget: int | None = Field(default=None, ge=1, description="Most lore tokens in a prompt (400).")


class PersonaSpec(_Strict):
    slug: str = Field(description="Lowercase letters, digits, '-' and '_'; the folder name by default.")
    name: str = Field(min_length=1, max_length=128, description="Display name.")
    description: str = ""
    system_prompt: str = ""
    character: CharacterDefinition | None = Field(
        default=None, description="A card's definition fields; the system prompt is built from them."
    )
    nickname: str = Field(default="", description="What {{char}} becomes when set (a V3 card's nickname).")
    user_name: str = Field(default="User", min_length=1, description="What {{user}} becomes.")
    greeting: str = ""
    alternate_greetings: list[str] = Field(default_factory=list)
    greeting_choice: Literal["first", "random"] = Field(
        default="first", description="'first': always `greeting`; 'random': any of the greetings."
    )
    lorebooks: list[str] = Field(default_factory=list, description="World Info JSON files, relative paths.")
    lore: LoreSettings = Field(default_factory=LoreSettings)
    template: Literal["model", "llama2", "chatml"] = Field(
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

    @field_validator("slug")
    @classmethod
    def _slug_shape(cls, value: str) -> str:
        if not re.match(SLUG_PATTERN, value):
            raise ValueError(
                "must be 1-64 lowercase letters, digits, '-' or '_', starting with a letter or digit"
            )
        return value

    @field_validator("dialogues")
    @classmethod
    def _relative_dialogues(cls, value: list[str]) -> list[str]:
        for rel in value:
            if not rel.strip():
                raise ValueError("dialogue paths must not be empty")
        return value

    @model_validator(mode="after")
    def _one_system_prompt(self) -> PersonaSpec:
        if self.character is not None and self.system_prompt.strip():
            raise ValueError("system_prompt: set it or a [character] table, not both")
        return self

    def raw_system_prompt(self) -> str:
        """The system prompt before macro expansion: `system_prompt`, or the [character] fields'."""
        if self.character is not None:
            return self.character.text() or "You are {{char}}."
        return self.system_prompt

    @model_validator(mode="after")
    def _context_fits_reply(self) -> PersonaSpec:
        if self.context_window is not None and self.sampling.max_new_tokens >= self.context_window:
            raise ValueError(
                f"context_window: must be larger than sampling.max_new_tokens ({self.sampling.max_new_tokens})"
            )
        return self


def display_path(path: Path) -> str:
    """`personas/pirate/persona.toml` when under the working directory, else the absolute path."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def describe_errors(exc: ValidationError, source: str) -> str:
    """`source: dotted.field: message` for each problem, joined on one line; input values left out."""
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        key = ".".join(str(p) for p in err["loc"])
        message = re.sub(r"^(Value|Assertion) error, ", "", err["msg"])
        if err["type"] == "extra_forbidden":
            message = "unknown key (a typo?)"
        problems.append(f"{source}: {key}: {message}" if key else f"{source}: {message}")
    return "; ".join(problems)


def load_spec(path: Path, *, check_files: bool = True) -> PersonaSpec:
    """Read and validate one `persona.toml`; every problem is a `PersonaError` naming file and field.

    The slug defaults to the folder's name. With `check_files`, every dialogue path must exist.
    """
    shown = display_path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PersonaError(f"{shown}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaError(f"{shown}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PersonaError(f"{shown}: invalid TOML: {exc}") from None
    data.setdefault("slug", path.parent.name)
    return validate_spec(data, shown, folder=path.parent if check_files else None)


def validate_spec(data: dict[str, Any], source: str, *, folder: Path | None = None) -> PersonaSpec:
    """Validate a persona given as a mapping (a parsed TOML, or a third-party package's dict).

    `folder` set: the dialogue paths, relative to it, must exist.
    """
    try:
        spec = PersonaSpec.model_validate(data)
    except ValidationError as exc:
        raise PersonaError(describe_errors(exc, source)) from None
    if folder is not None:
        for key in ("dialogues", "lorebooks"):
            for index, rel in enumerate(getattr(spec, key)):
                if not (folder / rel).is_file():
                    raise PersonaError(
                        f"{source}: {key}.{index}: file not found: {display_path(folder / rel)}"
                    )
    return spec
