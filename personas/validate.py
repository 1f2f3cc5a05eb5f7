"""Deeper checks of a loaded persona, for `personabot persona validate`.

Loading a persona already validates `persona.toml` and that its dialogue files exist; this also reads
the dialogue files line by line, imports `plugin.py`, and reads `card.json`. Token-level checks of the
dialogues (lengths, templates) are the trainer's `personabot dataset check`.
"""

from __future__ import annotations

import json

from bot.errors import PersonaError
from personas.cards import CARD_FILE
from personas.plugins import load_plugin
from personas.registry import Persona
from personas.spec import display_path

ROLES = ("system", "user", "assistant")


def check_dialogue_lines(persona: Persona) -> tuple[int, list[str]]:
    """(conversations, problems): every line must be `{"messages": [{"role", "content"}, ...]}`."""
    count = 0
    problems: list[str] = []
    for path in persona.dialogue_paths():
        shown = display_path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{shown}: cannot read: {exc}")
            continue
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{shown}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{where}: invalid JSON: {exc.msg}")
                continue
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages:
                problems.append(f'{where}: expected {{"messages": [...]}} with at least one message')
                continue
            bad = next(
                (
                    i
                    for i, m in enumerate(messages)
                    if not isinstance(m, dict)
                    or m.get("role") not in ROLES
                    or not isinstance(m.get("content"), str)
                ),
                None,
            )
            if bad is not None:
                problems.append(
                    f"{where}: messages.{bad}: needs a role ({', '.join(ROLES)}) and string content"
                )
                continue
            if not any(m["role"] == "assistant" for m in messages):
                problems.append(f"{where}: no assistant turn to train on")
                continue
            count += 1
    return count, problems


def validate_persona(persona: Persona) -> tuple[list[str], list[str]]:
    """(facts, problems) about one loaded persona."""
    facts: list[str] = []
    count, problems = check_dialogue_lines(persona)
    facts.append(f"{count} dialogues")
    try:
        hooks = load_plugin(persona)
    except PersonaError as exc:
        problems.append(str(exc))
    else:
        names = [n for n in ("before_prompt", "after_generation") if getattr(hooks, n, None) is not None]
        if names:
            facts.append("hooks: " + ", ".join(names))
    card = persona.folder / CARD_FILE
    if card.is_file():
        try:
            stored = json.loads(card.read_text(encoding="utf-8"))
            if not isinstance(stored, dict) or not isinstance(stored.get("data"), dict):
                raise ValueError("no card data")
        except (OSError, ValueError) as exc:
            problems.append(f"{display_path(card)}: corrupt ({exc})")
        else:
            facts.append(f"from a character card ({stored.get('source_spec', '?')})")
    return facts, problems
