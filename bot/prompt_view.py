"""The exact prompt a persona answers from, as data: `personabot prompt` prints it, the console shows it.

Only the model's tokenizer and config are read (never its weights, never torch), so a bot-only install
can show prompts too.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from bot.basemodel import resolve_model
from bot.config import Settings
from bot.events import utcnow
from bot.prompting import ChatRenderer, PromptError, Turn
from personas.registry import Persona


@lru_cache(maxsize=4)
def _tokenizer(folder: Path, gguf_file: str | None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)


@lru_cache(maxsize=4)
def _context_window(folder: Path, gguf_file: str | None) -> int:
    """The model's context window from its config (no weights are loaded); 2048 when it says none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file, local_files_only=True)
    except (OSError, ValueError):
        return 2048
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def _lore_report(rendered: Any) -> list[dict[str, Any]]:
    """The lorebook entries that fired, why, and whether the budget let them in."""
    if rendered.lore is None:
        return []
    return [
        {
            "entry": f.entry.label,
            "source": f.entry.source,
            "reason": f.reason,
            "tokens": f.tokens,
            "admitted": f.admitted,
            "position": f.entry.position,
        }
        for f in rendered.lore.fired
    ]


def render_view(
    settings: Settings,
    persona: Persona,
    turns: list[Turn],
    *,
    template: str | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Render `turns` as the worker would; the turns after the last user turn are left out (counted in
    `answered`). Raises `PromptError` when nothing is left to render or the token budget is impossible."""
    turns = list(turns)
    answered = 0
    while turns and turns[-1].role != "user":
        turns.pop()
        answered += 1
    if not turns:
        raise PromptError("the conversation has no user turn: there is nothing to render")
    spec = persona.spec
    location = resolve_model(settings)
    renderer = ChatRenderer(_tokenizer(location.folder, location.gguf_file), template or spec.template)
    window = spec.context_window or _context_window(location.folder, location.gguf_file)
    max_new = max_new_tokens if max_new_tokens is not None else spec.sampling.max_new_tokens
    if max_new < 0 or max_new >= window:
        raise PromptError(f"--max-new-tokens {max_new} must be between 0 and the context window ({window})")
    rendered = renderer.render_prompt(
        turns,
        system=persona.system_prompt(utcnow()),
        max_prompt_tokens=window - max_new,
        lore=persona.lorebook,
    )
    specials = renderer.special_positions(rendered.input_ids)
    names = renderer.tokenizer.convert_ids_to_tokens([i for _, i in specials])
    return {
        "text": rendered.text,
        "input_ids": rendered.input_ids,
        "special_token_positions": [
            {"position": pos, "id": tid, "token": name}
            for (pos, tid), name in zip(specials, names, strict=True)
        ],
        "dropped_turns": rendered.dropped_turns,
        "truncated": rendered.truncated,
        "tokens": len(rendered.input_ids),
        "max_prompt_tokens": window - max_new,
        "context_window": window,
        "max_new_tokens": max_new,
        "template": renderer.template,
        "prefix_stable": renderer.prefix_stable,
        "lore": _lore_report(rendered),
        "lore_tokens": rendered.lore.tokens if rendered.lore is not None else None,
        "answered": answered,
        "notes": list(renderer.notes),
    }


def render_text(view: dict[str, Any]) -> str:
    """The view as `personabot prompt` prints it: the prompt, a rule, then the budget and notes."""
    lines = [view["text"], "-" * 40]
    lines.append(
        f"{view['tokens']} tokens (limit {view['max_prompt_tokens']} = context window {view['context_window']} "
        f"- max_new_tokens {view['max_new_tokens']}), template {view['template']}"
    )
    cut = "; newest message cut" if view["truncated"] else ""
    lines.append(f"dropped turns: {view['dropped_turns']}{cut}")
    if view["answered"]:
        lines.append(f"(the {view['answered']} turn(s) after the last user message are left out)")
    if view["lore_tokens"] is not None:
        lore = view["lore"]
        admitted = [e for e in lore if e["admitted"]]
        lines.append(f"lore: {len(admitted)} entries in ({view['lore_tokens']} tokens), {len(lore)} fired")
        for e in lore:
            status = e["position"] if e["admitted"] else "over the token budget, left out"
            lines.append(f"  {e['entry']} ({e['source']}): {e['reason']}; {e['tokens']} tokens, {status}")
    lines += [f"note: {note}" for note in view["notes"]]
    return "\n".join(lines)
