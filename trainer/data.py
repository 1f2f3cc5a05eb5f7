"""Reading training conversations: JSONL chats and the tutorial's raw `<s>[INST] … [/INST] …</s>` lines.

Each non-blank line is one conversation, in either format (a file may mix them):

- `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` (a `name` key is
  allowed and kept);
- `<s>[INST] question [/INST] answer</s><s>[INST] next question [/INST] next answer</s>`, where the
  first question may start with `<<SYS>>\\n system prompt \\n<</SYS>>\\n\\n`.

A bad line is a `DataProblem` naming the file and line; reading goes on, so one run lists them all.
A persona imported from a character card has its example dialogues in its `dialogues.jsonl`, so those
are read the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.prompting import Turn

ROLES = ("system", "user", "assistant")

# One `<s>[INST] q [/INST] a</s>` exchange; the answer and its `</s>` may be missing on the last one.
_RAW_TURN = re.compile(r"\s*<s>\s*\[INST\](?P<user>.*?)\[/INST\](?P<answer>.*?)(?P<end></s>|(?=<s>)|$)", re.S)
_RAW_SYSTEM = re.compile(r"^\s*<<SYS>>\n?(?P<system>.*?)\n?<</SYS>>\s*", re.S)


@dataclass(frozen=True)
class DataProblem:
    """One bad line (line 0: the file as a whole)."""

    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "message": self.message}


@dataclass(frozen=True)
class Conversation:
    """One training conversation and where it came from. A leading system turn is its own prompt."""

    turns: tuple[Turn, ...]
    file: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def assistant_turns(self) -> list[Turn]:
        return [t for t in self.turns if t.role == "assistant"]


class LineError(ValueError):
    """A line that is not a conversation; the message says why."""


def shown_path(path: Path) -> str:
    """The path relative to the working directory when it is under it (shorter error lines)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_json_line(text: str) -> list[Turn]:
    """Turns of a `{"messages": [...]}` line; `LineError` for anything else."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(row, dict) or "messages" not in row:
        raise LineError('expected an object with a "messages" list')
    messages = row["messages"]
    if not isinstance(messages, list):
        raise LineError('"messages" must be a list')
    turns = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LineError(f"messages.{index}: expected an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise LineError(f"messages.{index}: unknown role {role!r}; use system, user or assistant")
        content = message.get("content")
        if not isinstance(content, str):
            raise LineError(f"messages.{index}: content must be a string")
        name = message.get("name")
        if name is not None and not isinstance(name, str):
            raise LineError(f"messages.{index}: name must be a string")
        turns.append(Turn(role, content, name))
    return turns


def parse_raw_line(text: str) -> list[Turn]:
    """Turns of a tutorial-format line `<s>[INST] q [/INST] a</s>…`; `LineError` when it is not one."""
    turns: list[Turn] = []
    position = 0
    text = text.rstrip()
    while position < len(text):
        match = _RAW_TURN.match(text, position)
        if match is None or match.end() == position:
            snippet = text[position : position + 30]
            raise LineError(f"expected <s>[INST] … [/INST] …</s> at column {position + 1}: {snippet!r}")
        user = match["user"]
        if not turns:
            system = _RAW_SYSTEM.match(user)
            if system is not None:
                turns.append(Turn("system", system["system"].strip()))
                user = user[system.end() :]
        answer = match["answer"]
        turns.append(Turn("user", user.strip()))
        # `[/INST]` with nothing after it and no `</s>` ends the conversation on a user turn.
        if match["end"] or answer.strip():
            turns.append(Turn("assistant", answer.strip()))
        position = match.end()
        if not match["end"] and position < len(text) and not text.startswith("<s>", position):
            raise LineError(f"expected </s> after the answer at column {position + 1}")
    return turns


def parse_line(text: str) -> list[Turn]:
    """One conversation from one line, in either format; checks it is something to train on."""
    stripped = text.lstrip()
    if stripped.startswith("{"):
        turns = parse_json_line(stripped)
    elif stripped.startswith(("<s>", "[INST]")):
        turns = parse_raw_line(stripped if stripped.startswith("<s>") else "<s>" + stripped)
    else:
        raise LineError('neither a JSON object ({"messages": [...]}) nor a <s>[INST] … [/INST] …</s> line')
    if not turns:
        raise LineError("empty conversation")
    if not any(t.role == "assistant" for t in turns):
        raise LineError("no assistant turn to train on")
    return turns


def read_conversations(paths: Iterable[Path]) -> tuple[list[Conversation], list[DataProblem]]:
    """Every conversation in `paths`, and a problem for every line (or file) that is not one."""
    conversations: list[Conversation] = []
    problems: list[DataProblem] = []
    for path in paths:
        shown = shown_path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            problems.append(DataProblem(shown, 0, "file not found"))
            continue
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(DataProblem(shown, 0, f"cannot read: {exc}"))
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                turns = parse_line(line)
            except LineError as exc:
                problems.append(DataProblem(shown, number, str(exc)))
                continue
            conversations.append(Conversation(tuple(turns), shown, number))
    return conversations, problems


def dataset_sha256(paths: Sequence[Path]) -> str:
    """A fingerprint of the training files' contents, in order (recorded in the adapter manifest)."""
    digest = hashlib.sha256()
    for path in paths:
        data = path.read_bytes()
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()
