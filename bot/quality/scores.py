"""The scores of `personabot eval`, as pure functions of the replies.

- **accuracy**: the reply matches the question's expected-answer regex (case-insensitive search);
- **style**: the persona's style check (`personas.style`), where it has one;
- **loop**: the reply repeats a sentence, or a run of words, three or more times (`bot.generation.guard`,
  the same detector the loop guard stops generation with), or the guard had to cut it;
- **drift**: the reply to an English question is not English. The heuristic counts common function
  words of English and of German, French, Italian, Spanish, Portuguese and Dutch: a reply is not English
  when it has at least two foreign ones and more foreign than English ones, or when over a third of its
  letters are outside the Latin script;
- **leak**: in a group chat, the model began its reply with a speaker-like `Name:` (`bot.replies`);
- **length** (mean words per reply) and **distinct-2** (distinct word bigrams / all word bigrams).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

from bot.generation.guard import loop_start
from bot.replies import speaker_prefix

_ENGLISH = frozenset(
    "the a an is are was were be been it its this that these those of to in on at for with and or but not "
    "you your ye yer i me my we our they their he she his her what which who how why when where there here "
    "can will would should could do does did have has had from by as so if than then into about".split()
)
_FOREIGN = (
    frozenset(
        # German
        "der die das und ist nicht ein eine einen ich du wir ihr sie es mit von den dem des auf für ja nein "
        "auch sehr hauptstadt deutschland ist sind war "
        # French
        "le la les est et un une des du je vous nous pas pour avec sur ce cette qui dans au aux mais c'est "
        # Italian
        "il lo gli è di che una per non sono della del alla anche come più "
        # Spanish and Portuguese
        "el los las y es que está son por con para muy pero também não uma são "
        # Dutch
        "het een niet ik jij wij zijn voor ook maar".split()
    )
    - _ENGLISH
)
_WORDS = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def is_correct(reply: str, expect: str) -> bool:
    return re.search(expect, reply, re.IGNORECASE) is not None


def loops(reply: str) -> bool:
    return loop_start(reply) is not None


def is_english(reply: str) -> bool:
    """The documented heuristic above; a reply with too few words to tell is English."""
    words = [w.lower() for w in _WORDS.findall(reply)]
    english = sum(w in _ENGLISH for w in words)
    foreign = sum(w in _FOREIGN for w in words)
    if foreign >= 2 and foreign > english:
        return False
    letters = [c for c in reply if c.isalpha()]
    latin = sum(c.isascii() or "\u00c0" <= c <= "\u024f" for c in letters)
    return not letters or latin * 3 >= 2 * len(letters)


def leaks_name(reply: str) -> bool:
    return speaker_prefix(reply) is not None


def word_count(reply: str) -> int:
    return len(reply.split())


def distinct_2(replies: Sequence[str]) -> float:
    """Distinct word bigrams over all word bigrams of all replies (0.0 when there are none)."""
    bigrams = []
    for reply in replies:
        words = reply.lower().split()
        bigrams.extend(itertools.pairwise(words))
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0
