"""A local transformers backend: the base model on CUDA (bf16) when present, the CPU (fp32) otherwise."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from bot.basemodel import ModelLocation
from bot.generation.base import GenerationRequest, GenerationResult, TokenCallback

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def pick_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    if requested != "auto":
        return getattr(torch, requested)
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_tokenizer(location: ModelLocation) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(location.folder, gguf_file=location.gguf_file, local_files_only=True)


def load_model(location: ModelLocation, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        location.folder, gguf_file=location.gguf_file, dtype=dtype, local_files_only=True
    )
    return model.to(device).eval()


class LocalBackend:
    """Generates with `transformers` `generate`, one request at a time."""

    def __init__(self, location: ModelLocation, device: str = "auto", dtype: str = "auto") -> None:
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        started = time.perf_counter()
        self.tokenizer = load_tokenizer(location)
        self.model = load_model(location, self.device, self.dtype)
        log.info(
            "loaded %s on %s (%s) in %.1fs",
            location.display,
            self.device,
            self.dtype,
            time.perf_counter() - started,
        )

    @property
    def context_window(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @torch.inference_mode()
    def generate(
        self, requests: list[GenerationRequest], on_text: TokenCallback | None = None
    ) -> list[GenerationResult]:
        return [self._one(req) for req in requests]

    def _one(self, req: GenerationRequest) -> GenerationResult:
        s = req.sampling
        if req.seed is not None:
            torch.manual_seed(req.seed)
        input_ids = torch.tensor([req.prompt_ids], device=self.device)
        greedy = s.temperature == 0
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=s.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else s.temperature,
            top_p=None if greedy else s.top_p,
            top_k=None if greedy else (s.top_k or None),
            repetition_penalty=s.repetition_penalty,
            eos_token_id=list(req.stop_ids) or None,
            pad_token_id=self.tokenizer.pad_token_id or (req.stop_ids[0] if req.stop_ids else 0),
        )
        new = out[0, input_ids.shape[1] :].tolist()
        finish = "length"
        if new and new[-1] in req.stop_ids:
            new = new[:-1]
            finish = "stop"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return GenerationResult(new, text.strip(), finish, prompt_tokens=len(req.prompt_ids))
