"""Splitting a long reply into messages under a platform's length limit.

Discord allows 2,000 characters per message, Telegram 4,096 UTF-16 code units. A reply is cut at the
best boundary that fits: a paragraph (or the start of a code block), then a line, then a sentence, then a
word; only a single "word" longer than the limit is cut mid-word (never inside a combining sequence).
A chunk that ends inside a fenced code block gets the fence closed, and the next chunk reopens it with
the same marker and language, so every message renders as code on its own.

Whitespace at a cut is dropped; nothing else is: the non-whitespace text of the chunks, minus the fence
lines added here, is the reply's.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

Measure = Callable[[str], int]

# An opening or closing fence line (CommonMark: up to three spaces of indent, 3+ backticks or tildes).
_FENCE_LINE = re.compile(r"^ {0,3}(?P<marker>`{3,}|~{3,})(?P<info>[^\n]*)$")

# Break opportunities, best first. Each match's span is whitespace removed at the cut; a chunk ends at
# the match's start and the next one begins at its end.
# Separators end at a line start, so a code line's indentation stays with it.
_PARAGRAPH = re.compile(r"[ \t]*\n(?:[ \t]*\n)+|[ \t]*\n(?= {0,3}(?:```|~~~))")
_LINE = re.compile(r"[ \t]*\n+")
_SENTENCE = re.compile(r"(?<=[.!?…。！？][\"'”’»)\]])\s+|(?<=[.!?…。！？])\s+")
_WORD = re.compile(r"\s+")
_BREAKS = (_PARAGRAPH, _LINE, _SENTENCE, _WORD)

_JOINERS = {"\u200d", "\u034f"}  # zero-width joiner, combining grapheme joiner


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units, the way Telegram counts (astral characters count twice)."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


@dataclass(frozen=True)
class Fence:
    """An open fenced code block: its marker (``` or ~~~, maybe longer) and info string."""

    marker: str
    info: str

    @property
    def opener(self) -> str:
        return self.marker + self.info

    def closed_by(self, marker: str, info: str) -> bool:
        return marker[0] == self.marker[0] and len(marker) >= len(self.marker) and not info.strip()


def open_fence(text: str, fence: Fence | None = None) -> Fence | None:
    """The code block still open at the end of `text` (None when outside any), starting in `fence`."""
    for line in text.split("\n"):
        match = _FENCE_LINE.match(line)
        if match is None:
            continue
        marker, info = match["marker"], match["info"]
        if fence is None:
            if marker[0] == "`" and "`" in info:
                continue  # CommonMark: a backtick fence's info string has no backticks (inline code)
            fence = Fence(marker, info.strip())
        elif fence.closed_by(marker, info):
            fence = None
    return fence


def _fit(text: str, budget: int, measure: Measure) -> int:
    """The most leading characters of `text` whose measure is within `budget`."""
    if measure is len:
        return max(0, min(len(text), budget))
    lo, hi = 0, min(len(text), max(budget, 0))  # every measure counts a character as at least one unit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if measure(text[:mid]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _is_attached(char: str) -> bool:
    """Characters that belong to the one before them: combining marks, joiners, variation selectors."""
    return (
        char in _JOINERS
        or unicodedata.combining(char) != 0
        or "\ufe00" <= char <= "\ufe0f"
        or "\U000e0100" <= char <= "\U000e01ef"
        or "\U0001f3fb" <= char <= "\U0001f3ff"  # skin tone modifiers
    )


def _hard_cut(text: str, n: int) -> int:
    """A cut at or before `n` that keeps combining sequences whole (falls back to `n`)."""
    cut = n
    while 0 < cut < len(text) and (_is_attached(text[cut]) or text[cut - 1] in _JOINERS):
        cut -= 1
    return cut if cut > 0 else n


def _best_break(text: str, n: int) -> tuple[int, int]:
    """(end of this chunk, start of the next) for the best break within the first `n` characters."""
    window = text[: n + 1]  # a separator starting exactly at n still leaves n characters before it
    for pattern in _BREAKS:
        best = None
        for match in pattern.finditer(window):
            if 0 < match.start() <= n and text[: match.start()].strip():
                best = match
        if best is not None:
            return best.start(), best.end()
    cut = _hard_cut(text, n)
    return cut, cut


def split_text(text: str, limit: int, *, measure: Measure = len) -> list[str]:
    """`text` as messages of at most `limit` units each (`measure`: `len`, or `utf16_len`).

    Whitespace-only text gives no messages; text within the limit is one message, stripped.
    `measure` must be additive and count every character as at least one unit.
    """
    if limit < 1:
        raise ValueError("limit must be positive")
    chunks: list[str] = []
    rest = text.strip()
    fence: Fence | None = None  # the code block `rest` starts inside
    while rest:
        head = fence.opener + "\n" if fence is not None else ""
        if measure(head) * 2 > limit:
            head = ""  # a fence line too long to repeat: keep the text, drop the re-opening
        if measure(head + rest) <= limit:
            chunks.append(head + rest)
            break
        reserve = 0
        for _ in range(4):
            n = _fit(rest, limit - measure(head) - reserve, measure)
            if n == 0:  # no room beside the fence lines: give them up for this chunk
                head, reserve = "", 0
                n = max(1, _fit(rest, limit, measure))
            end, start = _best_break(rest, n)
            body = rest[:end].rstrip()
            still_open = open_fence(head + body)
            closing = "\n" + still_open.marker if still_open is not None else ""
            if measure(head + body + closing) <= limit:
                break
            reserve = max(reserve + 1, measure(closing))  # cut again, leaving room for the closing
        else:
            closing, still_open = "", None  # only for absurdly long fence markers
        chunks.append(head + body + closing)
        fence = still_open
        # Outside code, leading whitespace carries no meaning; inside it, indentation does.
        rest = rest[start:].lstrip("\n") if fence is not None else rest[start:].lstrip()
        if fence is not None:
            first, _, after = rest.partition("\n")
            match = _FENCE_LINE.match(first)
            if match is not None and fence.closed_by(match["marker"], match["info"]):
                # The block ends right here: the closing just added stands for this line.
                rest, fence = after.lstrip(), None
        if not rest.strip():
            break
    return chunks
