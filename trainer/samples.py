"""Sample replies to held-out prompts, generated the way the worker answers: same renderer, same stops.

Each held-out conversation gives one prompt: its turns up to (not including) its first assistant turn.
Prompts are rendered with `ChatRenderer.render_prompt` and generation stops at the renderer's
`end_of_turn_ids`, so a reply here is what the bot would say in a chat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from bot.prompting import ChatRenderer, Turn
from bot.prompting.lorebook import Lorebook
from trainer.data import Conversation


@dataclass(frozen=True)
class Sample:
    """A held-out prompt, the reply the dialogues give, and the model's reply."""

    where: str
    prompt: str  # the last user message
    reference: str
    reply: str


def heldout_prompts(conversations: Sequence[Conversation]) -> list[tuple[Conversation, list[Turn], str]]:
    """(conversation, turns before its first assistant turn, that assistant turn's content)."""
    prompts = []
    for conversation in conversations:
        turns = list(conversation.turns)
        first = next(i for i, t in enumerate(turns) if t.role == "assistant")
        if any(t.role == "user" for t in turns[:first]):
            prompts.append((conversation, turns[:first], turns[first].content))
    return prompts


@torch.no_grad()
def generate_replies(
    model: Any,
    renderer: ChatRenderer,
    prompts: Sequence[Sequence[Turn]],
    *,
    system: str | None,
    sampling: Any,
    max_new_tokens: int,
    max_prompt_tokens: int,
    seed: int,
    device: torch.device | str,
    batch_size: int = 16,
    lore: Lorebook | None = None,
) -> list[str]:
    """One reply per prompt, with the persona's sampling settings and a fixed seed (batched, left-padded)."""
    tokenizer = renderer.tokenizer
    stops = list(renderer.end_of_turn_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    greedy = sampling.temperature == 0
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    replies: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            rendered = [
                renderer.render_prompt(
                    turns, system=system, max_prompt_tokens=max_prompt_tokens, lore=lore
                ).input_ids
                for turns in prompts[start : start + batch_size]
            ]
            width = max(len(ids) for ids in rendered)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rendered], device=device)
            mask = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in rendered], device=device
            )
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=not greedy,
                temperature=None if greedy else sampling.temperature,
                top_p=None if greedy else sampling.top_p,
                top_k=None if greedy else (sampling.top_k or None),
                repetition_penalty=sampling.repetition_penalty,
                eos_token_id=stops,
                pad_token_id=pad,
                use_cache=True,
            )
            for row in out[:, width:].tolist():
                end = next((i for i, t in enumerate(row) if t in stops), len(row))
                replies.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return replies
