"""A deterministic generation backend for tests that need replies but not a language model.

It follows the real backend's interface (a tokenizer, `generate(requests, on_text)`), so the real
worker, renderer, store and outbox run around it. The reply is computed from the rendered prompt by
`reply_fn` (default: echo the last user line), and streamed word by word through `on_text`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bot.generation.base import GenerationRequest, GenerationResult, TokenCallback
from tests.tiny import byte_level_tokenizer


def last_user_text(prompt: str) -> str:
    """The text of the last user turn in a ChatML prompt."""
    marker = "<|im_start|>user\n"
    tail = prompt.rsplit(marker, 1)[-1]
    return tail.split("<|im_end|>", 1)[0]


class ScriptedBackend:
    def __init__(
        self,
        reply_fn: Callable[[str], str] | None = None,
        *,
        tokenizer: Any | None = None,
        delay: float = 0.0,
        context_window: int = 4096,
    ) -> None:
        self.tokenizer = tokenizer or byte_level_tokenizer()
        self.reply_fn = reply_fn or (lambda prompt: f"echo -> {last_user_text(prompt)}")
        self.delay = delay  # seconds per streamed word, to exercise typing and streaming
        self.context_window = context_window
        self.prompts: list[str] = []  # every prompt seen, decoded, for assertions

    def generate(
        self, requests: list[GenerationRequest], on_text: TokenCallback | None = None
    ) -> list[GenerationResult]:
        results = []
        for index, request in enumerate(requests):
            prompt = self.tokenizer.decode(request.prompt_ids)
            self.prompts.append(prompt)
            reply = self.reply_fn(prompt)
            words = reply.split(" ")
            for n in range(1, len(words) + 1):
                if self.delay:
                    time.sleep(self.delay)
                if on_text is not None:
                    on_text(index, " ".join(words[:n]))
            ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"]
            results.append(GenerationResult(ids, reply, "stop", prompt_tokens=len(request.prompt_ids)))
        return results
