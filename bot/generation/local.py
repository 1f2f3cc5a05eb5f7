"""A local transformers backend: the base model on CUDA (bf16) when present, the CPU (fp32) otherwise.

Generation runs in `bot.generation.engine.BatchEngine` (batched, mixed LoRA adapters, KV reuse). On the
CPU the linear layers' weights are packed once for oneDNN (`bot.generation.packed`; `pack_weights=False`
keeps plain `nn.Linear` layers) or held as float16/int8/int4 (`weights=`, `bot.generation.quantized`), and
the torch thread count follows the cores other processes leave idle, unless `OMP_NUM_THREADS` (or `personabot worker --threads`) fixes it.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bot.basemodel import ModelLocation
from bot.errors import ConfigError
from bot.generation.base import GenerationCallbacks, GenerationRequest, GenerationResult
from bot.generation.engine import BatchEngine
from bot.generation.kvcache import KVCacheLRU
from bot.generation.leanforward import unsupported_reason
from bot.generation.lora import MultiLora
from bot.generation.packed import pack_linears
from bot.generation.quantized import WeightFormat, check_weight_format, quantize_linears

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """CUDA when present (auto), else the CPU; a requested device that is not there is a `ConfigError`."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(
            f"model.device: {requested!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"model.device: {requested!r} requested but CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"model.device: {requested!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_compile(compile_decode: bool, device: torch.device, dtype: torch.dtype, weights: str) -> None:
    """A `ConfigError` naming `model.compile` where the compiled decode step cannot run."""
    if not compile_decode:
        return
    if device.type != "cpu" or dtype != torch.float32 or weights not in ("auto", "int8"):
        raise ConfigError(
            "model.compile is for CPU serving of a float32 model, with model.weights auto or int8 (here: "
            f"{device.type}, {str(dtype).removeprefix('torch.')}, model.weights = {weights!r}); "
            "set model.compile = false"
        )


def _cpu_threads() -> Any:
    """Torch threads that follow the cores other processes leave idle (`OMP_NUM_THREADS` fixes them)."""
    from bot.cpu_threads import IdleCoreThreads, fixed_threads

    return IdleCoreThreads(fixed_threads(None))


def load_tokenizer(location: ModelLocation) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location.folder, gguf_file=location.gguf_file, local_files_only=True)


def load_model(location: ModelLocation, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        location.folder, gguf_file=location.gguf_file, dtype=dtype, local_files_only=True
    )
    # transformers wraps `to` with functools.wraps, which mypy reads as a function taking the model.
    return model.to(device).eval()  # type: ignore[arg-type]


class LocalBackend:
    """The base model once, every loaded persona's LoRA, batched generation with KV reuse across turns."""

    def __init__(
        self,
        location: ModelLocation,
        device: str = "auto",
        dtype: str = "auto",
        *,
        kv_cache_bytes: int = 0,
        pack_weights: bool | None = None,
        weights: WeightFormat = "auto",
        compile_decode: bool = False,
    ) -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        check_weight_format(weights, self.device, self.dtype)
        check_compile(compile_decode, self.device, self.dtype, weights)
        started = time.perf_counter()
        self.tokenizer = load_tokenizer(location)
        self.model = load_model(location, self.device, self.dtype)
        self.location = location
        self.weights = weights
        if weights != "auto":  # smaller weights for CPU serving (bot.generation.quantized)
            # q/k/v and gate/up quantized together where the lean forward runs (it calls them once)
            lean = unsupported_reason(self.model) is None
            self.packed_layers = quantize_linears(self.model, weights, fuse_siblings=lean)
        elif pack_weights is not False:
            # On the CPU, weights packed once for oneDNN make batched decoding ~1.5x faster.
            self.packed_layers = pack_linears(self.model)
        else:
            self.packed_layers = 0
        self.lora = MultiLora(self.model)
        self.kv = KVCacheLRU(kv_cache_bytes)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        self.engine = BatchEngine(self.model, self.tokenizer, lora=self.lora, kv=self.kv, pad_id=int(pad))
        self._threads = _cpu_threads() if self.device.type == "cpu" else None
        self.compiled = compile_decode and self.engine.compile_decode()
        log.info(
            "loaded %s on %s (%s%s) in %.1fs",
            location.display,
            self.device,
            self.dtype,
            f", {self.packed_layers} layers packed ({'oneDNN' if weights == 'auto' else weights})"
            if self.packed_layers
            else "",
            time.perf_counter() - started,
        )

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    def set_kv_budget(self, budget_bytes: int) -> None:
        """The channel KV cache's byte budget (0 turns reuse off)."""
        self.kv.budget_bytes = budget_bytes
        if budget_bytes <= 0:
            self.kv.clear()

    def load_adapter(self, name: str, folder: Path) -> int:
        """Load a peft LoRA folder as `name`; `AdapterLoadError` says what is wrong with it."""
        adapter = self.lora.load(name, folder)
        self.kv.drop_matching(lambda key: key.endswith(f"|{name}"))
        return adapter.nbytes

    def unload_adapter(self, name: str) -> None:
        self.lora.unload(name)
        self.kv.drop_matching(lambda key: key.endswith(f"|{name}"))

    @property
    def adapters(self) -> list[str]:
        return sorted(self.lora.adapters)

    def generate_batch(
        self, requests: list[GenerationRequest], callbacks: GenerationCallbacks
    ) -> list[GenerationResult]:
        if self._threads is not None:
            self._threads.adjust()
            self._threads.history.clear()  # a long-running worker keeps no log of it
        return self.engine.generate(requests, callbacks)

    def release_memory(self) -> None:
        """After a failed batch (out of memory): return freed blocks to the device."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
