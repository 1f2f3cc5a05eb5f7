"""The question set of `personabot eval`: conversations of questions, each with an expected-answer regex.

One JSON object per line: `{"id": "...", "turns": [{"ask": "...", "expect": "regex"}, ...]}`. A
conversation of one turn is a single question; longer ones are asked in order in one channel, so later
questions are answered with the earlier exchange in the prompt. The shipped set (`questions.jsonl`,
written for personabot) has 77 questions: 40 single questions and 11 conversations of 3-4 turns.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from bot.errors import PersonabotError

SHIPPED = Path(__file__).with_name("questions.jsonl")


class QuestionsError(PersonabotError):
    """A question file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Question:
    ask: str
    expect: str


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: tuple[Question, ...]


def read_questions(path: Path = SHIPPED) -> list[Conversation]:
    """The conversations in `path`; a `QuestionsError` naming file and line for a malformed one."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QuestionsError(f"{path}: cannot read: {exc}") from None
    found: list[Conversation] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise QuestionsError(f"{where}: invalid JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            raise QuestionsError(f'{where}: expected {{"id": "...", "turns": [...]}}')
        if row["id"] in seen:
            raise QuestionsError(f"{where}: id {row['id']!r} is used twice")
        seen.add(row["id"])
        turns = row.get("turns")
        if not isinstance(turns, list) or not turns:
            raise QuestionsError(f"{where}: turns: expected a non-empty list")
        questions = []
        for index, turn in enumerate(turns):
            ask, expect = (turn.get("ask"), turn.get("expect")) if isinstance(turn, dict) else (None, None)
            if not isinstance(ask, str) or not ask.strip() or not isinstance(expect, str):
                raise QuestionsError(f"{where}: turns[{index}]: expected {{'ask': text, 'expect': regex}}")
            try:
                re.compile(expect)
            except re.error as exc:
                raise QuestionsError(f"{where}: turns[{index}].expect: not a regex: {exc}") from None
            questions.append(Question(ask, expect))
        found.append(Conversation(row["id"], tuple(questions)))
    if not found:
        raise QuestionsError(f"{path}: no questions")
    return found
