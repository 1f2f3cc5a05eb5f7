"""Conversations from a JSONL file: one `{"role": ..., "content": ...}` object per line."""

from __future__ import annotations

import json
from pathlib import Path

from bot.prompting.errors import PromptError
from bot.prompting.types import ROLES, Turn


def read_history_file(path: Path) -> list[Turn]:
    """The turns in `path`; a malformed line is a `PromptError` naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise PromptError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: cannot read: {exc}") from None
    turns: list[Turn] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptError(f"{path}:{number}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise PromptError(f"{path}:{number}: expected an object with role and content")
        role, content, name = row.get("role"), row.get("content"), row.get("name")
        if role not in ROLES:
            raise PromptError(f"{path}:{number}: role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise PromptError(f"{path}:{number}: content must be a string")
        if name is not None and not isinstance(name, str):
            raise PromptError(f"{path}:{number}: name must be a string")
        turns.append(Turn(role, content, name))
    return turns
