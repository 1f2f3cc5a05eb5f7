"""Generation backends: one base model, many persona adapters.

- `base`: what the worker asks of a backend (requests, results, callbacks, optional adapter loading);
- `local.LocalBackend`: a Hugging Face model in this process, generating with `engine.BatchEngine`;
- `vllm.VllmBackend`: vLLM servers over their OpenAI-compatible API (token ids in, token ids out);
- `engine`: the batched decode loop; `lora`: many LoRA adapters in one batch; `kvcache`: the per-batch
  and per-channel key/value caches; `sampling`: per-row sampling; `detok`: incremental detokenization.
"""

from bot.generation.base import (
    AdapterHost,
    BackendUnavailable,
    GenerationBackend,
    GenerationCallbacks,
    GenerationCancelled,
    GenerationRequest,
    GenerationResult,
)

__all__ = [
    "AdapterHost",
    "BackendUnavailable",
    "GenerationBackend",
    "GenerationCallbacks",
    "GenerationCancelled",
    "GenerationRequest",
    "GenerationResult",
]
