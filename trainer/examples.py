"""Conversations to training rows, through `bot.prompting` (the renderer the worker answers with).

Labels come from `ChatRenderer.render_training` and nowhere else: the trainer never builds its own.
A conversation the template rejects (roles out of order) is a `DataProblem` at its file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.prompting import IGNORE_INDEX, ChatRenderer, PromptError, TrainingExample
from bot.prompting.lorebook import Lorebook
from trainer.data import Conversation, DataProblem


@dataclass(frozen=True)
class Row:
    """A rendered conversation: its ids and assistant-only labels, and where it came from."""

    conversation: Conversation
    example: TrainingExample

    @property
    def input_ids(self) -> list[int]:
        return self.example.input_ids

    @property
    def labels(self) -> list[int]:
        return self.example.labels

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.example.labels if label != IGNORE_INDEX)


@dataclass
class DatasetStats:
    """What `personabot dataset check` reports."""

    conversations: int = 0
    tokens: int = 0  # ids of the rows that are trained on, after cutting to the window
    trained_tokens: int = 0
    dropped: int = 0  # rows left with no trained token by the window
    truncated: int = 0  # rows cut by the window that still train something
    errors: list[DataProblem] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "conversations": self.conversations,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "dropped": self.dropped,
            "truncated": self.truncated,
            "errors": [e.as_dict() for e in self.errors],
        }


def render_rows(
    renderer: ChatRenderer,
    conversations: Sequence[Conversation],
    *,
    system: str | None,
    max_tokens: int,
    lore: Lorebook | None = None,
) -> tuple[list[Row], DatasetStats]:
    """Render every conversation; rows the window empties are counted and left out."""
    rows: list[Row] = []
    stats = DatasetStats()
    for conversation in conversations:
        try:
            example = renderer.render_training(
                conversation.turns, system=system, max_tokens=max_tokens, lore=lore
            )
        except PromptError as exc:
            stats.errors.append(DataProblem(conversation.file, conversation.line, str(exc)))
            continue
        stats.conversations += 1
        if example.dropped:
            stats.dropped += 1
            continue
        if example.truncated:
            stats.truncated += 1
        row = Row(conversation, example)
        stats.tokens += len(example.input_ids)
        stats.trained_tokens += row.trained_tokens
        rows.append(row)
    return rows, stats
