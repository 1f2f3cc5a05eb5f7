"""A generated reply before it is stored: speaker prefixes in group chats, and what the guard did.

In a group chat the model may begin its reply with a speaker's name ("Alecilopi: ..."), copying how
chat logs look. `speaker_prefix` recognises such a start; the worker strips it before the reply is
stored (so it never reaches a later prompt), and `personabot eval` counts how often the model wrote
one. `speaker_stops` are the stop texts that end a reply where the model starts writing the next
speaker's line ("\\nalice:").

`is_english` is the language-drift heuristic: it counts common function words of English and of German,
French, Italian, Spanish, Portuguese and Dutch; a text is not English when it has at least two foreign
ones and more foreign than English ones, or when over a third of its letters are outside the Latin
script. A reply to an English message that is not English is generated again (`retry_sampling`: sampled,
a fixed seed per attempt; `worker.language_retries` times at most) and the first English one is kept; if
none is, the first reply is stored but kept out of later prompts (as is one the loop guard cut), and
`personabot eval` counts it as drift.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from personas.spec import Sampling

# A speaker tag at the start of a reply: one to three name-like words (letters first; digits, dots,
# dashes and apostrophes inside) followed by a colon ("Alice:", "**Bob**:"), or in brackets with or
# without one ("[carol]", "<dave>:", "(alice wrote)"); then text on the same line.
_NAME = r"[^\W\d_][\w'.\-]{0,31}(?: [^\W\d_][\w'.\-]{0,31}){0,2}"
_PREFIX = re.compile(
    rf"^\s*\**(?:[\[<(](?P<tagged>{_NAME})[\]>)]\**[ \t]*:?|(?P<named>{_NAME})\**[ \t]*:)[ \t]+(?=\S)"
)


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


def drifted(question: str, reply: str) -> bool:
    """The reply to an English message is not English."""
    return is_english(question) and not is_english(reply)


# A language retry samples: greedy decoding would give the same reply again. Moderate settings, and a
# seed per attempt, so a retried reply is as repeatable as a first one.
RETRY_TEMPERATURE = 0.7
RETRY_TOP_P = 0.9
RETRY_SEED_STEP = 7919


def retry_sampling(sampling: Sampling, seed: int | None, attempt: int) -> tuple[Sampling, int | None]:
    """Sampling settings and seed for language retry `attempt` (1, 2, ...) of a reply (an unseeded reply
    retries unseeded)."""
    if sampling.temperature == 0:
        sampling = sampling.model_copy(update={"temperature": RETRY_TEMPERATURE, "top_p": RETRY_TOP_P})
    return sampling, None if seed is None else seed + RETRY_SEED_STEP * attempt


def keep_out_of_prompts(question: str, reply: str, finish_reason: str) -> bool:
    """A reply later prompts should not carry: cut by the loop guard, or not English when asked in English."""
    return finish_reason == "loop" or drifted(question, reply)


def speaker_prefix(text: str) -> str | None:
    """The leading `Name:` of `text` (the name), or None."""
    match = _PREFIX.match(text)
    return (match.group("tagged") or match.group("named")) if match else None


@dataclass(frozen=True)
class CleanedReply:
    text: str
    stripped_prefix: str | None  # the speaker name removed from the start, if any


def clean_reply(text: str, *, group: bool) -> CleanedReply:
    """The reply as it is stored: in group chats, leading `Name:` prefixes removed (all of them)."""
    text = text.strip()
    first: str | None = None
    while group and (match := _PREFIX.match(text)) is not None:
        first = first or match.group("tagged") or match.group("named")
        text = text[match.end() :].strip()
    return CleanedReply(text, first)


def speaker_stops(names: Iterable[str]) -> tuple[str, ...]:
    """Stop texts for a group chat: each speaker's name at the start of a new line, then a colon."""
    found = sorted({n.strip() for n in names if n and n.strip()})
    return tuple(f"\n{name}:" for name in found)
