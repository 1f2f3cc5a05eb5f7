"""The renderer's inputs and outputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from bot.prompting.lorebook import LoreInsertion

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")

# The label of a token the loss ignores (PyTorch's cross-entropy default).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Turn:
    """One message of a conversation, as the model sees it."""

    role: Role
    content: str
    name: str | None = None  # the speaker's display name in group chats (already part of `content`)


@dataclass(frozen=True)
class RenderedPrompt:
    """The ids the model answers from: the fitted conversation followed by the generation prompt."""

    input_ids: list[int]
    text: str
    dropped_turns: int  # whole turns left out, oldest first, to fit the budget
    truncated: bool = False  # the newest user message was cut (its oldest part), with a visible marker
    lore: LoreInsertion | None = None  # the lorebook entries that fired, when a lorebook was given


@dataclass(frozen=True)
class TrainingExample:
    """A rendered conversation and its labels: -100 everywhere except what the assistant says.

    `spans` are the trained `(start, end)` ranges, one per assistant turn that survived truncation: its
    content and the template text up to and including its end-of-turn token.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool  # `max_tokens` cut the end off
    dropped: bool  # no trained token is left: the row teaches nothing
    spans: tuple[tuple[int, int], ...] = ()
