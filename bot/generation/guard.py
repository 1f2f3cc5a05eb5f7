"""Ending replies early: the loop guard and text stop sequences, checked on the reply's text as it grows.

A small model sometimes falls into a loop ("Tokyo is the capital of Japan." thirty times). A repetition
penalty only makes the loop wander. The guard instead watches the text: once a sentence, or a run of
`NGRAM_WORDS` words, occurs `LOOP_REPEATS` times, the reply is over, and it ends at the last complete
sentence before the second occurrence (so the first, sound, occurrence is kept and nothing of the loop).

`loop_start` is also the loop detector of `personabot eval`, so the guard and the score agree.
`ReplyText` applies both to one reply as its tokens arrive; the local engine and the vLLM backend each
feed it, so both end replies at the same place.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from bot.generation.detok import IncrementalDecoder

LOOP_REPEATS = 3  # a unit seen this many times is a loop
NGRAM_WORDS = 6  # word runs this long repeated LOOP_REPEATS times are a loop even without punctuation

# The end of a sentence: terminal punctuation (and closing quotes/brackets) before whitespace, or a
# line break. Offsets are taken at the match's start, right after the punctuation.
_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"')\]]*(?=\s)|\n")
_WORD = re.compile(r"\S+")
_NOT_WORD = re.compile(r"[^\w]+")
_TERMINAL = ".!?…\"')]"


def _normal(text: str) -> str:
    return _NOT_WORD.sub(" ", text.lower()).strip()


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence or line of `text`, whitespace excluded."""
    spans = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.end() if match.group() != "\n" else match.start()
        spans.append((start, end))
        start = match.end()
    spans.append((start, len(text)))
    out = []
    for a, b in spans:
        while a < b and text[a].isspace():
            a += 1
        while b > a and text[b - 1].isspace():
            b -= 1
        if b > a:
            out.append((a, b))
    return out


def loop_start(text: str) -> int | None:
    """Offset of the second occurrence of the first unit (sentence or word run) that occurs
    `LOOP_REPEATS` times in `text`; None when nothing repeats that often."""
    found: int | None = None
    seen: dict[str, list[int]] = {}
    # A sentence still being written (no end yet) counts only once it is complete.
    sentences = _sentences(text)
    complete = sentences if text[-1:].isspace() or text[-1:] in _TERMINAL else sentences[:-1]
    for start, end in complete:
        key = _normal(text[start:end])
        if not key:
            continue
        where = seen.setdefault(key, [])
        where.append(start)
        if len(where) == LOOP_REPEATS:
            found = where[1] if found is None else min(found, where[1])
    words = [(m.start(), _normal(m.group())) for m in _WORD.finditer(text)]
    words = [(s, w) for s, w in words if w]
    runs: dict[tuple[str, ...], list[int]] = {}
    for i in range(len(words) - NGRAM_WORDS + 1):
        run = tuple(w for _, w in words[i : i + NGRAM_WORDS])
        where = runs.setdefault(run, [])
        # Overlapping occurrences of one run ("a a a a a a a a") still count: each is a new start.
        where.append(words[i][0])
        if len(where) == LOOP_REPEATS:
            found = where[1] if found is None else min(found, where[1])
    return found


def cut_before(text: str, offset: int) -> str:
    """`text` ended at the last complete sentence (or line) before `offset`; if none ends before it,
    everything before `offset`."""
    head = text[:offset]
    best = 0
    for _start, end in _sentences(head):
        if head[end - 1] in _TERMINAL or "\n" in head[end:]:
            best = end
    return (head[:best] if best else head).rstrip()


def first_stop(text: str, stops: Sequence[str], since: int = 0) -> int | None:
    """Offset of the earliest stop text in `text` (searching from `since` minus each stop's length)."""
    hits = [i for s in stops if s and (i := text.find(s, max(0, since - len(s)))) >= 0]
    return min(hits) if hits else None


class ReplyText:
    """One reply's text as its tokens arrive: decoded incrementally, ended by a stop text or the loop guard.

    `add` returns the text so far, or None once a stop text or the loop guard ended the reply; then
    `finish` is "stop" or "loop" and `cut` the text to keep (nothing of the stop text or the loop).
    """

    def __init__(self, tokenizer: Any, stop_texts: Sequence[str] = (), *, loop_guard: bool = True) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_texts = tuple(stop_texts)
        self.loop_guard = loop_guard
        self.cut: str | None = None
        self.finish: str | None = None

    def add(self, token: int) -> str | None:
        before = len(self.decoder.text)
        text = self.decoder.add(token)
        stop = first_stop(text, self.stop_texts, before)
        if stop is not None:
            self.cut, self.finish = text[:stop], "stop"
            return None
        looped = loop_start(text) if self.loop_guard else None
        if looped is not None:
            self.cut, self.finish = cut_before(text, looped), "loop"
            return None
        return text
