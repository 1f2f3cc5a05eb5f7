"""What the worker asks of a generation backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from personas.spec import Sampling


@dataclass(frozen=True)
class GenerationRequest:
    """One reply to generate."""

    prompt_ids: list[int]
    sampling: Sampling
    stop_ids: tuple[int, ...]
    adapter: str | None = None  # name of a loaded LoRA adapter; None: the base model
    cache_key: str | None = None  # channel/persona/adapter key for KV reuse across turns
    seed: int | None = None


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (end-of-turn token) or "length"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the cache
    timings: dict[str, float] = field(default_factory=dict)


# Called with (index of the request in the batch, the reply's text so far).
TokenCallback = Callable[[int, str], None]


class GenerationBackend(Protocol):
    tokenizer: object

    def generate(
        self, requests: list[GenerationRequest], on_text: TokenCallback | None = None
    ) -> list[GenerationResult]:
        """Generate every request (as one batch where the backend can); blocking."""
