"""Rendering a persona's conversation into the ids the model sees.

Walking-skeleton version: the tokenizer's own chat template, whole turns dropped oldest first until the
prompt fits. The full renderer (llama2/chatml templates, injection safety, incremental rendering) replaces
this module behind the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Turn:
    role: Role
    content: str
    name: str | None = None  # the speaker's display name in group chats


@dataclass(frozen=True)
class RenderedPrompt:
    input_ids: list[int]
    text: str
    dropped_turns: int
    truncated: bool = False


class ChatRenderer:
    """Formats conversations for one tokenizer and one template."""

    def __init__(self, tokenizer: Any, template: str = "model") -> None:
        self.tokenizer = tokenizer
        self.template = template
        eot = tokenizer.eos_token_id
        self.end_of_turn_ids: list[int] = [eot] if eot is not None else []

    def _messages(self, turns: Sequence[Turn], system: str | None) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": system}] if system else []
        return messages + [{"role": t.role, "content": t.content} for t in turns]

    def render_prompt(
        self, turns: Sequence[Turn], *, system: str | None, max_prompt_tokens: int
    ) -> RenderedPrompt:
        turns = list(turns)
        dropped = 0
        while True:
            text = self.tokenizer.apply_chat_template(
                self._messages(turns, system), tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) <= max_prompt_tokens or len(turns) <= 1:
                return RenderedPrompt(list(ids), text, dropped)
            turns.pop(0)
            dropped += 1
            while turns and turns[0].role != "user":
                turns.pop(0)
                dropped += 1
