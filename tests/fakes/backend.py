"""A deterministic generation backend for tests that need replies but not a language model.

It follows the real backend's interface (a tokenizer, `generate_batch(requests, callbacks)`), so the
real worker, renderer, store and outbox run around it. The reply is computed from the rendered prompt
by `reply_fn` (default: echo the last user line), and streamed word by word through `on_text`. Like a
remote server, it does not stop between words when asked to (`should_stop` is not checked).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bot.generation.base import GenerationCallbacks, GenerationRequest, GenerationResult
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

    def reply_for(self, request: GenerationRequest, prompt: str) -> str:
        """The reply to one request (a subclass may look at its sampling settings)."""
        return self.reply_fn(prompt)

    def finish_reason(self, prompt_index: int) -> str:
        """Why the reply to the `prompt_index`-th prompt seen ended (a subclass may say "loop")."""
        return "stop"

    def generate_batch(
        self, requests: list[GenerationRequest], callbacks: GenerationCallbacks
    ) -> list[GenerationResult]:
        results = []
        for index, request in enumerate(requests):
            prompt = self.tokenizer.decode(request.prompt_ids)
            self.prompts.append(prompt)
            reply = self.reply_for(request, prompt)
            words = reply.split(" ")
            for n in range(1, len(words) + 1):
                if self.delay:
                    time.sleep(self.delay)
                if n == 1 and callbacks.on_first_token is not None:
                    callbacks.on_first_token(index)
                if callbacks.on_text is not None:
                    callbacks.on_text(index, " ".join(words[:n]))
            ids = self.tokenizer(reply, add_special_tokens=False)["input_ids"]
            reason = self.finish_reason(len(self.prompts) - 1)
            results.append(GenerationResult(ids, reply, reason, prompt_tokens=len(request.prompt_ids)))
        for index, result in enumerate(results):
            if callbacks.on_finish is not None:
                callbacks.on_finish(index, result)
        return results
