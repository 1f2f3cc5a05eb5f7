"""Prefix stability, checked with hypothesis over random conversations for every template and tokenizer.

For every k at a user/assistant boundary, the prompt ids of `history[:k]` (ending with the generation
prompt) are a token-for-token prefix of the training ids of `history`, and the assistant's trained
span starts exactly where that prompt ends: the model answers from the ids it was trained on.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.prompting import Turn
from tests.test_prompting_injection import ATTACKS, MARKERS
from tests.test_prompting_templates import CASES, renderer

ODD = [
    "",
    " ",
    "\n",
    " \t\n ",
    "  leading",
    "trailing  ",
    "😀🎉👍🏽",
    "naïve café ß",
    "中文 日本語 العربية",
    "a\r\nb",
]

contents = st.one_of(
    st.text(max_size=24),
    st.sampled_from(MARKERS + ATTACKS + ODD),
    st.builds(lambda a, b, c: a + b + c, st.text(max_size=6), st.sampled_from(MARKERS), st.text(max_size=6)),
)
conversations = st.tuples(
    st.one_of(st.none(), contents),  # system prompt
    st.lists(st.tuples(contents, contents), min_size=1, max_size=4),  # (user, assistant) exchanges
    st.one_of(st.none(), contents),  # a final user turn, or none
)


def build(exchanges: list[tuple[str, str]], last: str | None) -> list[Turn]:
    turns = [t for user, answer in exchanges for t in (Turn("user", user), Turn("assistant", answer))]
    return [*turns, Turn("user", last)] if last is not None else turns


@pytest.mark.parametrize(("template", "kind"), CASES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations)
def test_prompt_ids_are_a_prefix_of_training_ids(
    template: str, kind: str, conversation: tuple[str | None, list[tuple[str, str]], str | None]
) -> None:
    system, exchanges, last = conversation
    r = renderer(template, kind)
    history = build(exchanges, last)
    training = r.render_training(history, system=system)
    assistant_at = [i for i, t in enumerate(history) if t.role == "assistant"]
    assert len(training.spans) == len(assistant_at)
    for k in range(1, len(history) + 1):
        if history[k - 1].role != "user":
            continue
        prompt = r.render_prompt(history[:k], system=system, max_prompt_tokens=10**9)
        assert prompt.dropped_turns == 0 and not prompt.truncated
        if kind == "byte_level":  # byte-level decoding is lossless for any text
            assert r.tokenizer.decode(prompt.input_ids) == prompt.text
        if k == len(history):  # ends on this user turn: the prompt is the training ids + generation prompt
            assert prompt.input_ids[: len(training.input_ids)] == training.input_ids
        else:
            assert training.input_ids[: len(prompt.input_ids)] == prompt.input_ids
            # The answer to this prompt is trained from the prompt's last token on.
            start, end = training.spans[assistant_at.index(k)]
            assert start == len(prompt.input_ids)
            assert training.input_ids[end - 1] in r.end_of_turn_ids


@pytest.mark.parametrize(("template", "kind"), CASES)
@settings(max_examples=25, deadline=None)
@given(conversation=conversations)
def test_cached_rendering_equals_uncached(
    template: str, kind: str, conversation: tuple[str | None, list[tuple[str, str]], str | None]
) -> None:
    system, exchanges, last = conversation
    r = renderer(template, kind)
    history = build(exchanges, last if last is not None else "next?")
    cache = r.channel_cache(("property", template, kind))
    for k in range(1, len(history) + 1, 2):
        budget = 10**9 if k % 3 else 40  # some renders must drop turns or cut the newest message
        try:
            cached = r.render_prompt(history[:k], system=system, max_prompt_tokens=budget, cache=cache)
        except Exception as exc:  # a budget too small for the system prompt: same error uncached
            with pytest.raises(type(exc)):
                r.render_prompt(history[:k], system=system, max_prompt_tokens=budget)
            continue
        assert cached == r.render_prompt(history[:k], system=system, max_prompt_tokens=budget)
