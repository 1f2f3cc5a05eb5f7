"""What a Jinja chat template writes around each message, found by rendering it with placeholders.

A template is rendered for short conversations whose contents are unique placeholders padded with
whitespace. Comparing the renders gives, per role, the text written before and after a message's
content, whether the template strips that content, the text that opens the first turn (a default or
given system prompt, a BOS) and the generation prompt. `discover` returns that `Layout`, or raises
`Unsegmentable` when the template cannot be built up turn by turn: it rewrites earlier turns when a new
one arrives, or writes a turn differently depending on its position.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Whitespace around each placeholder reveals whether the template strips contents.
LEFT_PAD = " \n\t"
RIGHT_PAD = "\t\n "
_CORE = re.compile("\ue000(\\d{4})\ue001")

Message = dict[str, str]
RenderFn = Callable[[Sequence[Message], bool], str]


class TemplateRejected(Exception):
    """The template raised while rendering (for example `raise_exception` for a role order)."""


class Unsegmentable(Exception):
    """The template cannot be rendered turn by turn; the message says why."""


def placeholder(index: int) -> str:
    return f"{LEFT_PAD}\ue000{index:04d}\ue001{RIGHT_PAD}"


@dataclass(frozen=True)
class Hole:
    """Where a message's content goes: `key` is its message index while parsing, then its kind."""

    key: int | str
    lstrip: bool
    rstrip: bool

    def shape(self, content: str) -> str:
        if self.lstrip:
            content = content.lstrip()
        if self.rstrip:
            content = content.rstrip()
        return content


@dataclass(frozen=True)
class Form:
    """Template text and holes, alternating: statics[0] hole[0] statics[1] ... statics[-1]."""

    statics: tuple[str, ...]
    holes: tuple[Hole, ...]


def parse(text: str) -> Form:
    """Split a placeholder render into template text and holes keyed by message index."""
    statics: list[str] = []
    holes: list[Hole] = []
    position = 0
    for match in _CORE.finditer(text):
        left = text[position : match.start()]
        lstrip = not left.endswith(LEFT_PAD)
        if not lstrip:
            left = left[: -len(LEFT_PAD)]
        rstrip = not text.startswith(RIGHT_PAD, match.end())
        position = match.end() if rstrip else match.end() + len(RIGHT_PAD)
        statics.append(left)
        holes.append(Hole(int(match.group(1)), lstrip, rstrip))
    statics.append(text[position:])
    return Form(tuple(statics), tuple(holes))


def _keyed(form: Form, kinds: dict[int, str], what: str) -> Form:
    """`form` with holes keyed by kind; each expected message must appear exactly once."""
    seen = [h.key for h in form.holes]
    if sorted(seen) != sorted(kinds):
        raise Unsegmentable(f"{what} does not show each message's content exactly once")
    return Form(form.statics, tuple(Hole(kinds[int(h.key)], h.lstrip, h.rstrip) for h in form.holes))


@dataclass(frozen=True)
class Layout:
    first: dict[bool, Form]  # the first user turn and all before it, keyed by "has a system prompt"
    turns: dict[str, Form]  # later turns: "user", "assistant", and "system" when the template allows it
    generation: str  # the generation prompt
    repeatable: frozenset[str]  # roles that may follow a turn of the same role
    system_supported: bool  # False: the template rejects or ignores system messages

    def static_texts(self) -> list[str]:
        forms = [*self.first.values(), *self.turns.values()]
        return [s for f in forms for s in f.statics] + [self.generation]


def _msgs(spec: Sequence[tuple[str, int]]) -> list[Message]:
    return [{"role": role, "content": placeholder(index)} for role, index in spec]


def _roles(spec: Sequence[tuple[str, int]]) -> str:
    return ", ".join(role for role, _ in spec) or "nothing"


def _delta(render: RenderFn, before: Sequence[tuple[str, int]], after: Sequence[tuple[str, int]]) -> str:
    """What rendering `after` adds to rendering `before`; `Unsegmentable` if it also changes it."""
    head, full = render(_msgs(before), False), render(_msgs(after), False)
    if not full.startswith(head):
        raise Unsegmentable(
            f"the template rewrites earlier turns: rendering [{_roles(before)}] is not a prefix of "
            f"rendering [{_roles(after)}]"
        )
    return full[len(head) :]


def discover(render: RenderFn) -> Layout:
    """The template's layout, from placeholder renders; `Unsegmentable` when there is none."""
    seq = [("user", 1), ("assistant", 2), ("user", 3), ("assistant", 4), ("user", 5)]
    first: dict[bool, Form] = {}
    turns: dict[str, Form] = {}
    generation: set[str] = set()
    system_supported = True
    for has_system in (False, True):
        base = [("system", 0)] if has_system else []
        try:
            head = render(_msgs([*base, seq[0]]), False)
            kinds = {0: "system", 1: "content"} if has_system else {1: "content"}
            first[has_system] = _keyed(parse(head), kinds, "the first turn")
        except (TemplateRejected, Unsegmentable) as exc:
            if not has_system:
                raise Unsegmentable(
                    f"the template rejects a conversation of one user message: {exc}"
                ) from None
            system_supported = False  # rejected, or the system prompt is not shown: fold it into the user's
            continue
        for k in range(1, len(seq)):
            role, index = seq[k]
            delta = _delta(render, [*base, *seq[:k]], [*base, *seq[: k + 1]])
            form = _keyed(parse(delta), {index: "content"}, f"a {role} turn")
            if turns.setdefault(role, form) != form:
                raise Unsegmentable(
                    f"the template writes {role} turns differently depending on their position"
                )
        for k in (1, 3, 5):
            plain = render(_msgs([*base, *seq[:k]]), False)
            prompted = render(_msgs([*base, *seq[:k]]), True)
            if not prompted.startswith(plain):
                raise Unsegmentable("the generation prompt rewrites the conversation before it")
            generation.add(prompted[len(plain) :])
    if len(generation) != 1:
        raise Unsegmentable("the generation prompt depends on the conversation before it")

    repeatable: set[str] = set()
    for role, spec in (("user", [seq[0], ("user", 3)]), ("assistant", [*seq[:2], ("assistant", 4)])):
        try:
            form = _keyed(parse(_delta(render, spec[:-1], spec)), {spec[-1][1]: "content"}, "a repeated turn")
        except (TemplateRejected, Unsegmentable):
            continue
        if form == turns[role]:
            repeatable.add(role)
    try:
        delta = _delta(render, seq[:2], [*seq[:2], ("system", 6)])
        turns["system"] = _keyed(parse(delta), {6: "content"}, "a system turn")
    except (TemplateRejected, Unsegmentable):
        pass  # system turns after the start are not supported
    return Layout(first, turns, generation.pop(), frozenset(repeatable), system_supported)
