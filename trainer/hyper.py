"""A run's hyperparameters: the persona's `[training]` and `[lora]` tables, then command-line overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from bot.errors import PersonabotError
from personas.spec import PersonaSpec


class HyperparameterError(PersonabotError):
    """A hyperparameter out of range (from the command line)."""


@dataclass(frozen=True)
class Hyperparameters:
    epochs: float
    learning_rate: float
    batch_size: int
    gradient_accumulation_steps: int
    max_seq_len: int
    warmup_ratio: float
    weight_decay: float
    heldout_fraction: float
    seed: int
    packing: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    target_modules: tuple[str, ...]
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hyperparameters:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["target_modules"] = tuple(values.get("target_modules", ()))
        return cls(**values)


def from_spec(spec: PersonaSpec) -> Hyperparameters:
    t, lora = spec.training, spec.lora
    return Hyperparameters(
        epochs=t.epochs,
        learning_rate=t.learning_rate,
        batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_seq_len=t.max_seq_len,
        warmup_ratio=t.warmup_ratio,
        weight_decay=t.weight_decay,
        heldout_fraction=t.heldout_fraction,
        seed=t.seed,
        packing=t.packing,
        lora_r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=tuple(lora.target_modules),
    )


_CHECKS: dict[str, tuple[str, Any]] = {
    "epochs": ("must be positive", lambda v: v > 0),
    "learning_rate": ("must be positive", lambda v: v > 0),
    "batch_size": ("must be at least 1", lambda v: v >= 1),
    "gradient_accumulation_steps": ("must be at least 1", lambda v: v >= 1),
    "max_seq_len": ("must be at least 16", lambda v: v >= 16),
    "lora_r": ("must be at least 1", lambda v: v >= 1),
    "lora_alpha": ("must be at least 1", lambda v: v >= 1),
    "lora_dropout": ("must be in [0, 1)", lambda v: 0 <= v < 1),
    "max_steps": ("must be at least 1", lambda v: v >= 1),
}


# Command-line spelling of the fields that have a short flag.
FLAGS = {
    "learning_rate": "--lr",
    "lora_r": "--r",
    "lora_alpha": "--alpha",
    "lora_dropout": "--dropout",
    "gradient_accumulation_steps": "--grad-accum",
}


def flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def with_overrides(base: Hyperparameters, overrides: dict[str, Any]) -> Hyperparameters:
    """`base` with the given (non-None) values replaced, each checked like `persona.toml` checks it."""
    chosen = {k: v for k, v in overrides.items() if v is not None}
    for name, value in chosen.items():
        message, ok = _CHECKS.get(name, ("", lambda v: True))
        if not ok(value):
            raise HyperparameterError(f"{flag(name)} {value}: {message}")
    return replace(base, **chosen)
