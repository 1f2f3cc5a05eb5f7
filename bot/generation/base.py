"""What the worker asks of a generation backend.

Every backend offers `generate(requests, on_text)`. A backend may also offer:

- `generate_batch(requests, callbacks)`: the same, with a callback when each row finishes (so its reply
  is written while longer rows still generate), time-to-first-token reports and cooperative stopping;
- `load_adapter(name, folder)` / `unload_adapter(name)`: LoRA adapters the requests name.
- `submit(requests, callbacks)`: `generate_batch` without blocking (a `concurrent.futures.Future`), for
  a backend that batches on its own (vLLM): the worker then keeps `worker.max_batch` jobs in flight and
  claims one whenever another ends, instead of one batch at a time;
- `ready()` (blocking, quick when healthy): False while a remote backend is down, so the worker leaves
  jobs queued; `health()`: its state as plain data, shown by `personabot status`.

`run_generation` calls whichever the backend has, so simple backends (test fakes, remote servers)
keep working.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from personas.spec import Sampling


@dataclass(frozen=True)
class GenerationRequest:
    """One reply to generate."""

    prompt_ids: list[int]
    sampling: Sampling
    stop_ids: tuple[int, ...]
    adapter: str | None = None  # name of a loaded LoRA adapter; None: the base model
    cache_key: str | None = None  # the channel/persona this prompt continues, for KV reuse across turns
    seed: int | None = None
    stop_texts: tuple[str, ...] = ()  # the reply ends before the first of these (e.g. "\nalice:")
    loop_guard: bool = True  # end the reply once it starts repeating itself (`bot.generation.guard`)


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    # "stop" (end-of-turn token or stop text), "length", or "loop" (the loop guard ended it; `text` is
    # cut at the last complete sentence before the loop, `bot.generation.guard`)
    finish_reason: str
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the cache
    timings: dict[str, float] = field(default_factory=dict)  # seconds: "first_token", "total"


# Called with (index of the request in the batch, the reply's text so far).
TokenCallback = Callable[[int, str], None]
# Called with (index of the request in the batch, its finished result).
FinishCallback = Callable[[int, GenerationResult], None]


@dataclass
class GenerationCallbacks:
    """Hooks a backend calls from its generating thread; each must be quick and thread-safe."""

    on_text: TokenCallback | None = None
    on_first_token: Callable[[int], None] | None = None
    on_finish: FinishCallback | None = None
    should_stop: Callable[[], bool] | None = None  # checked between decode steps


class GenerationCancelled(Exception):
    """`should_stop` said stop: the batch was abandoned; its unfinished requests have no result."""


class BackendUnavailable(Exception):
    """A remote backend could not be reached (connection error, timeout, 5xx): nothing is wrong with the
    requests. The worker fails the batch's unfinished jobs with a retry and claims no more until the
    backend's `ready()` says it is back; it does not split the batch to find a culprit."""


class GenerationBackend(Protocol):
    tokenizer: Any

    def generate(
        self, requests: list[GenerationRequest], on_text: TokenCallback | None = None
    ) -> list[GenerationResult]:
        """Generate every request (as one batch where the backend can); blocking."""


@runtime_checkable
class AdapterHost(Protocol):
    """A backend that serves LoRA adapters by name."""

    def load_adapter(self, name: str, folder: Path) -> int:
        """Load a peft adapter folder under `name`; returns its size in bytes."""

    def unload_adapter(self, name: str) -> None: ...


def run_generation(
    backend: GenerationBackend, requests: list[GenerationRequest], callbacks: GenerationCallbacks
) -> list[GenerationResult]:
    """Generate with `generate_batch` when the backend has it, else `generate` plus the same callbacks."""
    batch = getattr(backend, "generate_batch", None)
    if batch is not None:
        return list(batch(requests, callbacks))
    seen: set[int] = set()

    def on_text(index: int, text: str) -> None:
        if index not in seen:
            seen.add(index)
            if callbacks.on_first_token is not None:
                callbacks.on_first_token(index)
        if callbacks.on_text is not None:
            callbacks.on_text(index, text)

    results = backend.generate(requests, on_text)
    for index, result in enumerate(results):
        if index not in seen and callbacks.on_first_token is not None:
            callbacks.on_first_token(index)
        if callbacks.on_finish is not None:
            callbacks.on_finish(index, result)
    return results


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA or CPU allocation failure, which a smaller batch may avoid."""
    # Only a backend that runs torch can raise its errors; a worker without torch never imports it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    if isinstance(exc, (RuntimeError, MemoryError)):
        text = str(exc).lower()
        return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text
    return False
