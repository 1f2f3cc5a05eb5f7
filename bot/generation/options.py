"""Sampling options one request asks for (the API's `temperature`, `top_p`, `top_k`,
`repetition_penalty`, `max_tokens`, `stop`, `seed`), stored with its reply job and applied over the persona's own settings by the worker.

The persona sets the limits: `max_tokens` never exceeds its `sampling.max_new_tokens`; the rest must lie
in the ranges OpenAI documents (the API refuses values outside them before a job is queued).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from personas.spec import Sampling

MAX_STOPS = 4  # as OpenAI's API
MAX_STOP_CHARS = 128


@dataclass(frozen=True)
class Applied:
    sampling: Sampling
    stop_texts: tuple[str, ...]
    seed: int | None


def apply_options(sampling: Sampling, options: dict[str, Any] | None) -> Applied:
    """The persona's sampling with a request's options over it, clamped to the persona's limits."""
    if not options:
        return Applied(sampling, (), None)
    update: dict[str, Any] = {}
    if options.get("temperature") is not None:
        update["temperature"] = min(max(float(options["temperature"]), 0.0), 2.0)
    if options.get("top_p") is not None:
        update["top_p"] = min(max(float(options["top_p"]), 1e-6), 1.0)
    if options.get("top_k") is not None:
        update["top_k"] = max(int(options["top_k"]), 0)
    if options.get("repetition_penalty") is not None:
        update["repetition_penalty"] = min(max(float(options["repetition_penalty"]), 0.5), 2.0)
    if options.get("max_tokens") is not None:
        update["max_new_tokens"] = min(max(int(options["max_tokens"]), 1), sampling.max_new_tokens)
    stops = tuple(str(s)[:MAX_STOP_CHARS] for s in options.get("stop") or () if s)[:MAX_STOPS]
    seed = options.get("seed")
    return Applied(sampling.model_copy(update=update), stops, int(seed) if seed is not None else None)
