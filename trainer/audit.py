"""The mask audit: before any training step, every row's trained tokens must spell the assistant turns.

For each row, the runs of consecutive trained positions are read back and checked against the
conversation it came from, independently of how the renderer built the labels:

- a trained label always equals the input id at its position (labels are not shifted here);
- there is one run per assistant turn, in order (every assistant turn is trained, not only the last);
- each run ends with an end-of-turn token, and the rest of it decodes to that turn's content;
- in a row cut by the context window, the last run may stop early: then it decodes to the start of the
  turn's content and its end-of-turn token is not trained;
- no run starts on a structural token (`<|im_start|>`, `<s>`, ...), so no role header is ever trained.

Content is compared with runs of whitespace collapsed, since templates strip or pad contents and
decoders differ on a leading space; a trained role header, a user's words or a missing end-of-turn token
all change the text. The edges are checked apart: a run may begin or end with spaces, but not with a
newline the content does not have (the newline after `<|im_start|>assistant` must stay untrained).

One failing row raises `MaskAuditError` carrying a printable dump of its labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.errors import PersonabotError
from bot.prompting import IGNORE_INDEX, ChatRenderer
from trainer.examples import Row


class MaskAuditError(PersonabotError):
    """A row whose labels do not train exactly the assistant turns; `details` shows the row."""

    def __init__(self, message: str, details: str) -> None:
        super().__init__(message)
        self.details = details


def _runs(labels: Sequence[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start = None
    for index, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, index))
            start = None
    if start is not None:
        runs.append((start, len(labels)))
    return runs


def _words(text: str) -> str:
    return " ".join(text.split())


def _edge(trained: str, content: str) -> bool:
    """True when a run's edge is a newline/tab the content does not have there (a template's, trained)."""
    return trained.isspace() and not content.isspace()


def dump_row(row: Row, tokenizer: Any, limit: int = 400) -> str:
    """The conversation and a token-by-token table of its ids and labels (for a failed audit)."""
    lines = [f"conversation {row.conversation.where}:"]
    for turn in row.conversation.turns:
        lines.append(f"  {turn.role}: {turn.content!r}")
    lines.append("  pos      id  label  token")
    ids, labels = row.input_ids, row.labels
    for pos in range(min(len(ids), limit)):
        token = tokenizer.convert_ids_to_tokens(ids[pos])
        label = "-100" if labels[pos] == IGNORE_INDEX else str(labels[pos])
        mark = "*" if labels[pos] != IGNORE_INDEX else " "
        lines.append(f"  {pos:>4} {ids[pos]:>7} {label:>6}{mark} {token!r}")
    if len(ids) > limit:
        lines.append(f"  … {len(ids) - limit} more")
    return "\n".join(lines)


def audit_row(row: Row, renderer: ChatRenderer) -> str | None:
    """Why the row's labels are wrong, or None when they train exactly its assistant turns."""
    tokenizer = renderer.tokenizer
    ids, labels = row.input_ids, row.labels
    if len(ids) != len(labels):
        return f"{len(ids)} ids but {len(labels)} labels"
    for pos, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label != IGNORE_INDEX and label != token:
            return f"position {pos}: label {label} is not the input id {token}"
    eot = set(renderer.end_of_turn_ids)
    structural = renderer.structural_ids
    runs = _runs(labels)
    wanted = row.conversation.assistant_turns
    truncated = row.example.truncated
    if len(runs) > len(wanted) or (len(runs) < len(wanted) and not truncated):
        return f"{len(runs)} trained runs for {len(wanted)} assistant turns"
    for number, ((start, end), turn) in enumerate(zip(runs, wanted, strict=False), 1):
        if ids[start] in structural and ids[start] not in eot:
            return f"assistant turn {number}: trained run starts on template token {ids[start]}"
        complete = ids[end - 1] in eot
        content = _words(turn.content)
        text = tokenizer.decode(ids[start : end - 1 if complete else end], skip_special_tokens=False)
        if _edge(text.lstrip(" ")[:1], turn.content.lstrip(" ")[:1]):
            return f"assistant turn {number}: trains whitespace before the content ({text[:12]!r}…)"
        if complete:
            if _edge(text.rstrip(" ")[-1:], turn.content.rstrip(" ")[-1:]):
                return f"assistant turn {number}: trains whitespace after the content (…{text[-12:]!r})"
            if _words(text) != content:
                return f"assistant turn {number}: trained tokens spell {_words(text)!r}, not {content!r}"
            continue
        last = number == len(runs) and truncated and end == len(ids)
        if not last:
            return f"assistant turn {number}: the trained run does not end with an end-of-turn token"
        body = _words(text)
        # The cut can split a word (or a multi-byte character) in two: compare whole words only.
        head = body.rsplit(" ", 1)[0] if " " in body else ""
        if not content.startswith(head):
            return f"assistant turn {number} (cut by the window): trained tokens spell {body!r}"
    return None


def audit_rows(rows: Sequence[Row], renderer: ChatRenderer) -> int:
    """Audit every row; raises `MaskAuditError` at the first bad one. Returns the rows audited."""
    for row in rows:
        problem = audit_row(row, renderer)
        if problem is not None:
            raise MaskAuditError(
                f"mask audit failed for {row.conversation.where}: {problem}; training aborted",
                dump_row(row, renderer.tokenizer),
            )
    return len(rows)
