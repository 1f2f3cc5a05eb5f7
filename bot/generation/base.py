"""What the worker asks of a generation backend.

Every backend offers `generate_batch(requests, callbacks)`: the batch's replies, with a callback as
text streams, when each row's first token comes, when each row finishes (so its reply is written while
longer rows still generate), and a check for cooperative stopping. A backend may also offer:

- `load_adapter(name, folder)` / `unload_adapter(name)`: LoRA adapters the requests name.
- `submit(requests, callbacks)`: `generate_batch` without blocking (a `concurrent.futures.Future`), for
  a backend that batches on its own (vLLM): the worker then keeps `worker.max_batch` jobs in flight and
  claims one whenever another ends, instead of one batch at a time;
- `ready()` (blocking, quick when healthy): False while a remote backend is down, so the worker leaves
  jobs queued; `health()`: its state as plain data, shown by `personabot status` (`RemoteBackend`).
- a KV cache reused across turns, its budget and a way to give memory back (`LocalMemory`).
- `close()`: resources to free when the worker stops (`Closeable`).

Each optional capability is a runtime-checkable Protocol: the worker asks `isinstance`, so a backend
has a capability only by offering all of its parts.
"""

from __future__ import annotations

import concurrent.futures
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
    # A transformers tokenizer (or one that behaves like it): its many methods are the library's.
    tokenizer: Any

    @property
    def context_window(self) -> int:
        """Tokens the model attends to; prompts are fitted into it."""

    def generate_batch(
        self, requests: list[GenerationRequest], callbacks: GenerationCallbacks
    ) -> list[GenerationResult]:
        """Generate every request (as one batch where the backend can), calling `callbacks`; blocking."""


@runtime_checkable
class AdapterHost(Protocol):
    """A backend that serves LoRA adapters by name."""

    def load_adapter(self, name: str, folder: Path) -> int:
        """Load a peft adapter folder under `name`; returns its size in bytes."""

    def unload_adapter(self, name: str) -> None: ...


@runtime_checkable
class RemoteBackend(Protocol):
    """A backend on servers that can be down while the worker runs."""

    def ready(self) -> bool:
        """False while no server can take requests (blocking; quick when healthy)."""

    def health(self) -> dict[str, object]:
        """Its state as plain data, shown by `personabot status`."""


class KVStats(Protocol):
    @property
    def nbytes(self) -> int:
        """Bytes the cached KV tensors hold."""


@runtime_checkable
class LocalMemory(Protocol):
    """A backend holding a KV cache in this process's memory (reused across a channel's turns)."""

    @property
    def kv(self) -> KVStats: ...

    def set_kv_budget(self, budget_bytes: int) -> None:
        """Cap the KV cache (`worker.kv_cache_bytes`); 0 turns reuse off."""

    def release_memory(self) -> None:
        """After a failed batch (out of memory): give freed blocks back to the device."""


@runtime_checkable
class Submits(Protocol):
    """A backend that batches on its own (vLLM): requests are handed over without blocking."""

    def submit(
        self, requests: list[GenerationRequest], callbacks: GenerationCallbacks
    ) -> concurrent.futures.Future[list[GenerationResult]]:
        """`generate_batch` without waiting for it."""


@runtime_checkable
class Closeable(Protocol):
    def close(self) -> None:
        """Free what the backend holds (connections, threads); called when the worker stops."""


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
