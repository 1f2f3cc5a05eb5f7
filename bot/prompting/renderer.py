"""Rendering a persona's conversation into the ids the model sees: one renderer for training and replies.

`ChatRenderer` builds ids by concatenating segments, never by tokenizing a formatted string:

- template text (role headers, `[INST]`, `<|im_start|>`) with its special tokens taken by id;
- message contents (user, assistant, system prompt), tokenized as plain text by `PlainEncoder`, so no
  content can ever produce a special token's id.

Each segment is tokenized on its own, so the ids of a conversation are the ids of its turns one after
another. That makes three things exact: the label spans of assistant turns (`render_training`), the
prefix property (the prompt for `history[:k]` is a token-for-token prefix of the training ids of
`history`), and incremental rendering (a `PromptCache` keeps each turn's ids, so the next turn of a
channel tokenizes only the new message).

Where a model's own template cannot be built turn by turn (it rewrites earlier turns), the renderer
falls back to rendering the whole conversation with placeholders each time; contents are still
tokenized as plain text and labels stay exact, but `prefix_stable` is False and `notes` says why.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar, cast

from bot.prompting.encoder import PlainEncoder, StaticEncoder, structural_tokens
from bot.prompting.errors import PromptError
from bot.prompting.layout import (
    Form,
    Hole,
    Layout,
    Message,
    TemplateRejected,
    Unsegmentable,
    discover,
    parse,
    placeholder,
)
from bot.prompting.lorebook import Lorebook, LoreInsertion, activate, compose, scan_window
from bot.prompting.templates import TEMPLATE_NAMES, check_required, check_static_text, resolve
from bot.prompting.types import IGNORE_INDEX, ROLES, RenderedPrompt, TrainingExample, Turn

log = logging.getLogger(__name__)

# Put in front of the newest user message when its oldest part had to be cut to fit the window.
TRUNCATION_MARKER = "[…] "

# A system prompt the template cannot show goes in front of the first user message.
FOLD_SEPARATOR = "\n\n"

_TRAILING_SPACES = re.compile(r" +$")

# Contents the model's template is checked with: padding, empty strings, newlines, non-ASCII.
_SAMPLE_USER = ("Hello there!", "  padded question? \n", "two\nlines", "", "What’s up 😀")
_SAMPLE_ASSISTANT = ("Hi, how can I help?", " leading space", "", "trailing\n\n", "Sure.")
_SAMPLE_SYSTEM = "Be brief.\n Stay kind. "


@dataclass(frozen=True)
class _Static:
    """Template text and its ids."""

    text: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class _Slot:
    """A hole for content; `lead` is the template's whitespace before it, tokenized with the content."""

    kind: str  # "content" or "system"
    lstrip: bool
    rstrip: bool
    lead: str

    def text(self, content: str) -> str:
        return self.lead + Hole(self.kind, self.lstrip, self.rstrip).shape(content)


@dataclass(frozen=True)
class _Form:
    """A compiled turn: statics[0] slots[0] statics[1] ...; for assistant turns, what is trained."""

    statics: tuple[_Static, ...]
    slots: tuple[_Slot, ...]
    trained_tail: int  # ids of the static after the content that are trained: through end-of-turn


@dataclass(frozen=True)
class _Piece:
    """Rendered turns (or the generation prompt): ids, text, and the trained ranges within the ids."""

    ids: tuple[int, ...]
    text: str
    spans: tuple[tuple[int, int], ...] = ()


class PromptCache:
    """One channel's rendered turns, kept between calls so the next render tokenizes only new turns.

    Entries are keyed by the turn's content, so an edited or deleted message is simply re-rendered.
    After each render the cache keeps only what that render used, which bounds it to one context window.
    """

    def __init__(self) -> None:
        self.owner: object | None = None
        self.entries: dict[Hashable, object] = {}
        self.hits = 0
        self.misses = 0


_T = TypeVar("_T")


class _Memo:
    """Per-call view of a `PromptCache` (or of nothing): reuse, record what is used, commit."""

    def __init__(self, owner: object, cache: PromptCache | None) -> None:
        self.cache = cache
        self.owner = owner
        self.old = cache.entries if cache is not None and cache.owner is owner else {}
        self.new: dict[Hashable, object] = {}

    def get(self, key: Hashable, make: Callable[[], _T]) -> _T:
        value = self.new.get(key)
        if value is None:
            value = self.old.get(key)
            if value is None:
                value = make()
                if self.cache is not None:
                    self.cache.misses += 1
            elif self.cache is not None:
                self.cache.hits += 1
            self.new[key] = value
        # A key's first element names its kind ("text", "first", a role), and one kind is always
        # made by the same function: the cached value has the type `make` returns.
        return cast(_T, value)

    def encoded(self, text: str, plain: PlainEncoder) -> tuple[int, ...]:
        """`text` tokenized as plain text, once per text."""
        return self.get(("text", text), lambda: tuple(plain.encode(text)))

    def commit(self) -> None:
        if self.cache is not None:
            self.cache.owner = self.owner
            self.cache.entries = self.new


def _concat(pieces: Sequence[_Piece]) -> tuple[list[int], str, list[tuple[int, int]]]:
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    for piece in pieces:
        spans.extend((len(ids) + start, len(ids) + end) for start, end in piece.spans)
        ids.extend(piece.ids)
    return ids, "".join(p.text for p in pieces), spans


class ChatRenderer:
    """Formats conversations for one tokenizer and one template (`model`, `llama2` or `chatml`).

    Raises `PromptError` for an unknown template, or when a structural token of the template is not a
    token of the tokenizer.
    """

    def __init__(self, tokenizer: Any, template: str = "model", *, max_channels: int = 256) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.source = resolve(template, tokenizer)
        what = getattr(tokenizer, "name_or_path", "") or "this model"
        required = check_required(self.source, tokenizer, what)
        self.structural: dict[str, int] = structural_tokens(tokenizer, required)
        self.structural_ids = frozenset(self.structural.values())
        self.plain = PlainEncoder(tokenizer, self.structural)
        self.static = StaticEncoder(self.plain, self.structural)
        self.notes: list[str] = []
        self.max_channels = max_channels
        self._channels: OrderedDict[Hashable, PromptCache] = OrderedDict()

        self.layout: Layout | None
        try:
            self.layout = discover(self._jinja)
        except Unsegmentable as exc:
            self.layout = None
            self.notes.append(f"template {template!r} is rendered whole each time: {exc}")
        if self.layout is not None:
            check_static_text(self.source, self.layout.static_texts(), self.structural)
            self._compile(self.layout)
        else:
            self._compile_full()
        self._check_against_template()
        for note in self.notes:
            log.warning("%s", note)

    # ----------------------------------------------------------------------------------- compiling

    @property
    def mode(self) -> str:
        """Either "segments" (incremental, turn by turn) or "full" (the whole template each time)."""
        return "segments" if self.layout is not None else "full"

    def _jinja(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    list(messages),
                    chat_template=self.source.jinja,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                )
            )
        except Exception as exc:  # a template's raise_exception, or its own bug
            raise TemplateRejected(str(exc) or type(exc).__name__) from None

    def _static(self, text: str) -> _Static:
        return _Static(text, self.static.encode(text))

    def _compile_form(self, form: Form, assistant: bool = False) -> _Form:
        statics = list(form.statics)
        slots: list[_Slot] = []
        for index, hole in enumerate(form.holes):
            # A space before a content belongs to its first word (SentencePiece "▁", byte-level "Ġ").
            lead = _TRAILING_SPACES.search(statics[index])
            lead_text = lead.group() if lead else ""
            statics[index] = statics[index][: len(statics[index]) - len(lead_text)]
            slots.append(_Slot(str(hole.key), hole.lstrip, hole.rstrip, lead_text))
        compiled = tuple(self._static(s) for s in statics)
        tail = 0
        if assistant:
            after = compiled[-1].ids
            tail = next((i + 1 for i, t in enumerate(after) if t in self.structural_ids), 0)
        return _Form(compiled, tuple(slots), tail)

    def _end_of_turn(self, assistant: _Form) -> None:
        after = assistant.statics[-1].ids[: assistant.trained_tail]
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if after:
            eot = after[-1]
        elif eos is not None:
            eot = int(eos)
            self.notes.append(
                f"template {self.template!r} writes no special token after an assistant turn; "
                "generation stops at the tokenizer's eos token, which training never shows"
            )
        else:
            raise PromptError(f"template {self.template!r}: cannot tell where an assistant turn ends")
        self.end_of_turn_ids: list[int] = [eot] + ([int(eos)] if eos is not None and eos != eot else [])

    def _compile(self, layout: Layout) -> None:
        self._first = {k: self._compile_form(f) for k, f in layout.first.items()}
        self._forms = {r: self._compile_form(f, assistant=r == "assistant") for r, f in layout.turns.items()}
        self._system_supported = layout.system_supported
        self._repeatable = layout.repeatable
        generation = layout.generation
        stripped = generation.rstrip(" ")  # trailing spaces belong to the reply's first token
        self._generation_spaces = generation[len(stripped) :]
        self._generation = _Piece(self.static.encode(stripped), stripped)
        assistant = self._forms["assistant"]
        self._end_of_turn(assistant)
        opening = assistant.statics[0].ids
        self.prefix_stable = opening[: len(self._generation.ids)] == self._generation.ids
        if not self.prefix_stable:
            self.notes.append(
                f"template {self.template!r}: the generation prompt {stripped!r} is not how assistant "
                "turns begin in training; prompts are not a prefix of the training ids"
            )

    def _compile_full(self) -> None:
        """Full-render mode: the end-of-turn token and system support come from one probe render."""
        self.prefix_stable = False
        self._repeatable = frozenset(("user", "assistant"))  # the template itself decides
        self._generation_spaces = ""
        try:
            probe = parse(
                self._jinja(
                    [
                        {"role": "user", "content": placeholder(1)},
                        {"role": "assistant", "content": placeholder(2)},
                    ],
                    False,
                )
            )
        except TemplateRejected as exc:
            raise PromptError(
                f"template {self.template!r} rejects a user turn followed by an assistant turn: {exc}"
            ) from None
        check_static_text(self.source, list(probe.statics), self.structural)
        keys = [h.key for h in probe.holes]
        if 2 not in keys:
            raise PromptError(f"template {self.template!r} does not show assistant turns")
        at = keys.index(2)
        form = Form(
            (probe.statics[at], probe.statics[at + 1]),
            (Hole("content", probe.holes[at].lstrip, probe.holes[at].rstrip),),
        )
        self._forms = {"assistant": self._compile_form(form, assistant=True)}
        self._end_of_turn(self._forms["assistant"])
        try:
            shown = parse(
                self._jinja(
                    [
                        {"role": "system", "content": placeholder(0)},
                        {"role": "user", "content": placeholder(1)},
                    ],
                    False,
                )
            )
            self._system_supported = 0 in [h.key for h in shown.holes]
        except TemplateRejected:
            self._system_supported = False

    def _check_against_template(self) -> None:
        """The renderer's text must be the template's own, for sample conversations."""
        mismatch = self._first_mismatch()
        if mismatch is None:
            return
        if self.layout is not None:
            # Turn-by-turn rendering differs; rendering whole may not (a position-dependent strip).
            saved = self.layout, self.prefix_stable
            self.layout = None
            self._compile_full()
            if self._first_mismatch() is None:
                self.notes.append(f"template {self.template!r} is rendered whole each time: {mismatch}")
                return
            self.layout, self.prefix_stable = saved
            self._compile(self.layout)
        self.notes.append(f"template {self.template!r} is reproduced inexactly: {mismatch}")

    def _first_mismatch(self) -> str | None:
        systems: list[str | None] = [None, _SAMPLE_SYSTEM] if self._system_supported else [None]
        conversations: list[list[Turn]] = []
        for n in range(1, 6):
            conversations.append(
                [
                    Turn("user", _SAMPLE_USER[i // 2])
                    if i % 2 == 0
                    else Turn("assistant", _SAMPLE_ASSISTANT[i // 2])
                    for i in range(n)
                ]
            )
        if "user" in self._repeatable:
            conversations.append([Turn("user", "one"), Turn("user", " two "), Turn("assistant", "both")])
        if self.layout is not None and "system" in self._forms:
            conversations.append(
                [
                    Turn("user", "hi"),
                    Turn("assistant", "yo"),
                    Turn("system", " now terse "),
                    Turn("user", "ok"),
                ]
            )
        for system in systems:
            for turns in conversations:
                generate = turns[-1].role == "user"
                messages = ([{"role": "system", "content": system}] if system is not None else []) + [
                    {"role": t.role, "content": t.content} for t in turns
                ]
                try:
                    expected = self._jinja(messages, generate)
                except TemplateRejected:
                    continue
                try:
                    pieces = self._pieces(system, turns, _Memo(self, None), generate)
                except PromptError:
                    continue
                text = "".join(p.text for p in pieces) + (self._generation_spaces if generate else "")
                if text != expected:
                    roles = ", ".join(["system"] * (system is not None) + [t.role for t in turns])
                    return f"for [{roles}] it writes {text!r} where the template writes {expected!r}"
        return None

    # ------------------------------------------------------------------------------------ checking

    def _prepare(self, turns: Sequence[Turn], system: str | None) -> tuple[str | None, list[Turn], int]:
        """Validated turns: (system prompt, turns after it, how many leading turns became the system)."""
        for number, turn in enumerate(turns, 1):
            if turn.role not in ROLES:
                raise PromptError(f"turn {number}: unknown role {turn.role!r}; use system, user or assistant")
            if not isinstance(turn.content, str):
                raise PromptError(f"turn {number}: content must be text, not {type(turn.content).__name__}")
        body = list(turns)
        offset = 0
        if body and body[0].role == "system":
            system, body, offset = body[0].content, body[1:], 1  # the conversation's own system prompt wins
        if system is not None and not isinstance(system, str):
            raise PromptError(f"system prompt must be text, not {type(system).__name__}")
        if not any(t.role == "user" for t in body):
            raise PromptError("the conversation has no user turn")
        if body[0].role != "user":
            raise PromptError(
                f"turn {offset + 1}: the conversation starts with role {body[0].role!r}; "
                f"template {self.template!r} needs a user turn first"
            )
        for index in range(1, len(body)):
            role, number = body[index].role, offset + index + 1
            if role == "system" and self.layout is not None and "system" not in self._forms:
                raise PromptError(
                    f"turn {number}: template {self.template!r} does not support a system turn after the start"
                )
            if role != "system" and role == body[index - 1].role and role not in self._repeatable:
                raise PromptError(
                    f"turns {number - 1} and {number} are both {role}: template {self.template!r} needs "
                    "user and assistant turns to alternate"
                )
        return system, body, offset

    def allows_repeated(self, role: str) -> bool:
        """Whether the template accepts two `role` turns in a row."""
        return role in self._repeatable

    def check(self, turns: Sequence[Turn], *, system: str | None = None) -> None:
        """Raise `PromptError` for a conversation this template cannot render (roles, order)."""
        self._prepare(turns, system)

    # ---------------------------------------------------------------------------- turn rendering

    def _turn(self, form: _Form, values: dict[str, str], memo: _Memo, trained: bool) -> _Piece:
        """A turn's ids: template ids as compiled, contents tokenized as plain text."""
        ids: list[int] = []
        texts: list[str] = []
        spans: tuple[tuple[int, int], ...] = ()
        for index, slot in enumerate(form.slots):
            ids.extend(form.statics[index].ids)
            texts.append(form.statics[index].text)
            text = slot.text(values[slot.kind])
            start = len(ids)
            ids.extend(memo.encoded(text, self.plain))
            texts.append(text)
            if trained and slot.kind == "content":
                spans = ((start, len(ids) + form.trained_tail),)
        ids.extend(form.statics[-1].ids)
        texts.append(form.statics[-1].text)
        return _Piece(tuple(ids), "".join(texts), spans)

    def _first_piece(self, system: str | None, turn: Turn, memo: _Memo) -> _Piece:
        values = {"content": turn.content, "system": system or ""}
        form = self._first[system is not None and self._system_supported]
        if system is not None and not self._system_supported:
            values = {"content": system + FOLD_SEPARATOR + turn.content}
        elif system is not None and [s.kind for s in form.slots] == ["system", "content"]:
            # Lore changes the system prompt from turn to turn: its part and each turn's part are cached
            # apart, so a new system prompt is tokenized once, not once per candidate first turn.
            rest = memo.get(
                ("first-tail", turn.content),
                lambda: self._turn(_Form(form.statics[1:], form.slots[1:], 0), values, memo, False),
            )

            def join() -> _Piece:
                head = _Form((form.statics[0], _Static("", ())), form.slots[:1], 0)
                top = memo.get(("first-head", system), lambda: self._turn(head, values, memo, False))
                return _Piece(top.ids + rest.ids, top.text + rest.text)

            return memo.get(("first", system, turn.content), join)
        return memo.get(("first", system, turn.content), lambda: self._turn(form, values, memo, False))

    def _later_piece(self, turn: Turn, memo: _Memo) -> _Piece:
        form = self._forms[turn.role]
        trained = turn.role == "assistant"
        return memo.get(
            (turn.role, turn.content), lambda: self._turn(form, {"content": turn.content}, memo, trained)
        )

    def _pieces(self, system: str | None, body: Sequence[Turn], memo: _Memo, generate: bool) -> list[_Piece]:
        """The whole conversation, unfitted: turn pieces, then the generation prompt if asked."""
        if self.layout is None:
            return [self._full(system, body, memo, generate)]
        pieces = [self._first_piece(system, body[0], memo)]
        pieces += [self._later_piece(t, memo) for t in body[1:]]
        if generate:
            pieces.append(self._generation)
        return pieces

    def _full(self, system: str | None, body: Sequence[Turn], memo: _Memo, generate: bool) -> _Piece:
        """Full-render mode: the template over placeholders, then contents put in as plain text."""
        contents: dict[int, tuple[str, str]] = {}
        messages: list[Message] = []
        if system is not None and self._system_supported:
            messages.append({"role": "system", "content": placeholder(0)})
            contents[0] = ("system", system)
        for index, turn in enumerate(body, 1):
            content = turn.content
            if index == 1 and system is not None and not self._system_supported:
                content = system + FOLD_SEPARATOR + content
            messages.append({"role": turn.role, "content": placeholder(index)})
            contents[index] = (turn.role, content)
        try:
            form = parse(self._jinja(messages, generate))
        except TemplateRejected as exc:
            raise PromptError(f"template {self.template!r} rejects this conversation: {exc}") from None
        statics = list(form.statics)
        if generate:
            statics[-1] = statics[-1].rstrip(" ")  # the reply's first token carries its own space
        leads = []
        for index in range(len(form.holes)):
            lead = _TRAILING_SPACES.search(statics[index])
            leads.append(lead.group() if lead else "")
            statics[index] = statics[index][: len(statics[index]) - len(leads[-1])]
        compiled = [self._static(text) for text in statics]
        ids: list[int] = []
        texts: list[str] = []
        spans: list[tuple[int, int]] = []
        for index, hole in enumerate(form.holes):
            ids.extend(compiled[index].ids)
            texts.append(compiled[index].text)
            role, content = contents[int(hole.key)]
            text = leads[index] + hole.shape(content)
            start = len(ids)
            ids.extend(memo.encoded(text, self.plain))
            texts.append(text)
            if role == "assistant":
                after = compiled[index + 1].ids
                tail = next((i + 1 for i, t in enumerate(after) if t in self.structural_ids), 0)
                spans.append((start, len(ids) + tail))
        ids.extend(compiled[-1].ids)
        texts.append(compiled[-1].text)
        return _Piece(tuple(ids), "".join(texts), tuple(spans))

    # ----------------------------------------------------------------------------------- prompts

    def channel_cache(self, key: Hashable) -> PromptCache:
        """The `PromptCache` of one channel (any hashable key), from a bounded LRU held by the renderer."""
        cache = self._channels.get(key)
        if cache is None:
            cache = self._channels[key] = PromptCache()
            while len(self._channels) > self.max_channels:
                self._channels.popitem(last=False)
        else:
            self._channels.move_to_end(key)
        return cache

    def render_prompt(
        self,
        turns: Sequence[Turn],
        *,
        system: str | None,
        max_prompt_tokens: int,
        cache: PromptCache | None = None,
        lore: Lorebook | None = None,
    ) -> RenderedPrompt:
        """The prompt to answer the last (user) turn: fitted to `max_prompt_tokens`, ending with the
        generation prompt.

        Keeps the system prompt; drops whole turns, oldest first, so the kept conversation still starts
        with a user turn; if the newest user message alone is too long, cuts its oldest part and marks
        the cut with `TRUNCATION_MARKER`. Pass the channel's `cache` to tokenize only new turns, and
        the persona's `lore` to put the lorebook entries the conversation activates around the system
        prompt (`RenderedPrompt.lore` says which fired and why).
        """
        system, body, _ = self._prepare(turns, system)
        if body[-1].role != "user":
            raise PromptError(
                f"the conversation ends with a {body[-1].role} turn; there is nothing to answer"
            )
        if max_prompt_tokens < 1:
            raise PromptError(f"max_prompt_tokens must be positive, not {max_prompt_tokens}")
        memo = _Memo(self, cache)
        try:
            system, inserted = self._with_lore(system, body, lore, memo)
            if self.layout is None:
                rendered = self._fit_full(system, body, max_prompt_tokens, memo)
            else:
                rendered = self._fit_segments(system, body, max_prompt_tokens, memo)
            return replace(rendered, lore=inserted) if inserted is not None else rendered
        finally:
            memo.commit()

    # -- lorebook hook: matching lives in bot.prompting.lorebook; here it only becomes system text.
    def _with_lore(
        self, system: str | None, body: Sequence[Turn], lore: Lorebook | None, memo: _Memo
    ) -> tuple[str | None, LoreInsertion | None]:
        if lore is None or not lore.entries:
            return system, None
        scanned = scan_window([t.content for t in body], [t.role for t in body])

        def count(text: str) -> int:
            return len(memo.encoded(text, self.plain))

        inserted = activate(lore, scanned, count)
        return compose(system, inserted), inserted

    # -- end of the lorebook hook

    def _fit_segments(self, system: str | None, body: list[Turn], budget: int, memo: _Memo) -> RenderedPrompt:
        generation = self._generation
        later: dict[int, _Piece] = {}
        used = len(generation.ids)  # ids of every turn after the one being considered as the first
        best: tuple[int, _Piece] | None = None
        # Newest to oldest: stop as soon as the turns after a candidate alone overflow the budget,
        # so a long history costs no more than a window's worth of turns.
        for index in range(len(body) - 1, -1, -1):
            turn = body[index]
            if turn.role == "user":
                first = self._first_piece(system, turn, memo)
                if len(first.ids) + used <= budget:
                    best = (index, first)
            if index == 0:
                break
            later[index] = self._later_piece(turn, memo)
            used += len(later[index].ids)
            if used > budget:
                break
        if best is None:
            return self._truncate_newest(system, body, budget, memo)
        start, first = best
        ids, text, _ = _concat([first, *(later[i] for i in range(start + 1, len(body))), generation])
        return RenderedPrompt(ids, text, dropped_turns=start)

    def _fit_full(self, system: str | None, body: list[Turn], budget: int, memo: _Memo) -> RenderedPrompt:
        starts = [i for i, t in enumerate(body) if t.role == "user"]

        def render(start: int) -> _Piece:
            return self._full(system, body[start:], memo, True)

        # Fewer turns render shorter: find the oldest user turn the budget can start from.
        low, high = 0, len(starts) - 1
        found: tuple[int, _Piece] | None = None
        while low <= high:
            middle = (low + high) // 2
            piece = render(starts[middle])
            if len(piece.ids) <= budget:
                found = (starts[middle], piece)
                high = middle - 1
            else:
                low = middle + 1
        if found is None:
            return self._truncate_newest(system, body, budget, memo)
        start, piece = found
        return RenderedPrompt(list(piece.ids), piece.text, dropped_turns=start)

    def _truncate_newest(
        self, system: str | None, body: list[Turn], budget: int, memo: _Memo
    ) -> RenderedPrompt:
        """Only the newest user message, its oldest part cut (behind a marker) until the prompt fits."""
        newest = body[-1]

        def render(content: str) -> _Piece:
            turn = Turn("user", content, newest.name)
            scratch = _Memo(self, None)  # trial cuts are not worth caching
            pieces = self._pieces(system, [turn], scratch, True)
            ids, text, _ = _concat(pieces)
            return _Piece(tuple(ids), text)

        shortest = render(TRUNCATION_MARKER)
        if len(shortest.ids) > budget:
            raise PromptError(
                f"max_prompt_tokens={budget} leaves no room for the newest message: the system prompt and "
                f"template alone take {len(shortest.ids)} tokens"
            )
        content = newest.content
        low, high = 0, len(content)  # the smallest cut that fits; cutting everything always fits
        while low < high:
            middle = (low + high) // 2
            if len(render(TRUNCATION_MARKER + content[middle:]).ids) <= budget:
                high = middle
            else:
                low = middle + 1
        piece = render(TRUNCATION_MARKER + content[low:])
        return RenderedPrompt(list(piece.ids), piece.text, dropped_turns=len(body) - 1, truncated=True)

    # ---------------------------------------------------------------------------------- training

    def render_training(
        self,
        turns: Sequence[Turn],
        *,
        system: str | None,
        max_tokens: int | None = None,
        lore: Lorebook | None = None,
    ) -> TrainingExample:
        """Ids and labels for the assistant-only loss, with the same segments `render_prompt` uses.

        Every label is -100 except each assistant turn's content and the template text through its
        end-of-turn token. `max_tokens` keeps the start and cuts the end; a row left with no trained
        token is `dropped`.
        """
        system, body, _ = self._prepare(turns, system)
        memo = _Memo(self, None)
        system, _ = self._with_lore(system, body, lore, memo)  # the lore of the last reply's prompt
        pieces = self._pieces(system, body, memo, False)
        ids, _, spans = _concat(pieces)
        truncated = max_tokens is not None and len(ids) > max_tokens
        if truncated:
            assert max_tokens is not None
            ids = ids[:max_tokens]
            spans = [(s, min(e, max_tokens)) for s, e in spans if s < max_tokens]
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        kept = tuple((s, e) for s, e in spans if e > s)
        dropped = not any(label != IGNORE_INDEX for label in labels)
        return TrainingExample(ids, labels, truncated=truncated, dropped=dropped, spans=kept)

    def trained_text(self, content: str) -> str:
        """The text an assistant turn's trained tokens spell: its content as the template writes it,
        then the template text through the end-of-turn token (for mask audits)."""
        form = self._forms["assistant"]
        after = form.statics[-1]
        tail = ""
        if form.trained_tail:
            names = {i: name for name, i in self.structural.items()}
            token = names[after.ids[form.trained_tail - 1]]
            tail = after.text[: after.text.index(token) + len(token)]
        return form.slots[0].text(content) + tail

    # ------------------------------------------------------------------------------------ helpers

    def special_positions(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """(position, id) of every structural token in `ids`."""
        return [(i, t) for i, t in enumerate(ids) if t in self.structural_ids]

    def __repr__(self) -> str:
        return f"ChatRenderer(template={self.template!r}, mode={self.mode!r}, prefix_stable={self.prefix_stable})"


__all__ = ["TEMPLATE_NAMES", "TRUNCATION_MARKER", "ChatRenderer", "PromptCache"]
