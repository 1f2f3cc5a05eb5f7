"""The scores of `personabot eval`, as pure functions of the replies.

- **accuracy**: the reply matches the question's expected-answer regex (case-insensitive search);
- **style**: the persona's style check (`personas.style`), where it has one;
- **loop**: the reply repeats a sentence, or a run of words, three or more times (`bot.generation.guard`,
  the same detector the loop guard stops generation with), in the reply as delivered; replies the
  guard cut short are counted apart (`guard_cut_rate`);
- **drift**: the reply to an English question is not English (`bot.replies.is_english`);
- **leak**: in a group chat, the model began its reply with a speaker-like `Name:` (`bot.replies`);
- **length** (mean words per reply) and **distinct-2** (distinct word bigrams / all word bigrams).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from bot.generation.guard import loop_start
from bot.replies import is_english, speaker_prefix


def is_correct(reply: str, expect: str) -> bool:
    return re.search(expect, reply, re.IGNORECASE) is not None


def loops(reply: str) -> bool:
    return loop_start(reply) is not None


def leaks_name(reply: str) -> bool:
    return speaker_prefix(reply) is not None


def word_count(reply: str) -> int:
    return len(reply.split())


def distinct_2(replies: Sequence[str]) -> float:
    """Distinct word bigrams over all word bigrams of all replies (0.0 when there are none)."""
    bigrams: list[tuple[str, str]] = []
    for reply in replies:
        words = reply.lower().split()
        bigrams.extend(itertools.pairwise(words))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


__all__ = ["distinct_2", "is_correct", "is_english", "leaks_name", "loops", "word_count"]
