"""Templates: the tutorial's llama2 format byte for byte, chatml, the model's own template, bad input.

Also holds `renderer(template, kind)`, the six template × tokenizer cases the other prompting tests use.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

import pytest

from bot.prompting import ChatRenderer, PromptError, Turn
from tests.tiny import byte_level_tokenizer, sentencepiece_tokenizer, with_special_tokens

# From the seed tutorial, copied exactly (note the U+2019 in "What’s" in step 1.1).
TUTORIAL_DIALOGUE = (
    "<s>[INST] What’s the capital of Germany? [/INST] The capital of Germany is Berlin.</s>"
    "<s>[INST] What about France? [/INST] The capital of France is Paris.</s>"
)
GERMANY = [
    Turn("user", "What’s the capital of Germany?"),
    Turn("assistant", "The capital of Germany is Berlin."),
    Turn("user", "What about France?"),
    Turn("assistant", "The capital of France is Paris."),
]
SAN_JOSE = "What's the best way to get from San Jose to San Francisco?"
FIRST_PROMPT = "<s>[INST] What's the best way to get from San Jose to San Francisco? [/INST]"
REPLY = "The best way depends on your priorities. Caltrain is a great option..."
# Step 2.3.3, with "What's the best way...?" and "The best way depends on..." filled in.
SECOND_PROMPT = (
    "<s>[INST] What's the best way to get from San Jose to San Francisco? [/INST] "
    "The best way depends on your priorities. Caltrain is a great option...</s>"
    "<s>[INST] I want to optimize for speed. [/INST]"
)

TEMPLATES = ("llama2", "chatml", "model")
KINDS = ("sentencepiece", "byte_level")
CASES = [(t, k) for t in TEMPLATES for k in KINDS]


def tokenizer(template: str, kind: str) -> Any:
    """A tiny tokenizer with the structural tokens `template` needs."""
    if kind == "sentencepiece":
        tok = sentencepiece_tokenizer()
        return with_special_tokens(tok, "<|im_start|>", "<|im_end|>") if template == "chatml" else tok
    tok = byte_level_tokenizer()
    return with_special_tokens(tok, "<s>", "</s>") if template == "llama2" else tok


@cache
def renderer(template: str, kind: str) -> ChatRenderer:
    return ChatRenderer(tokenizer(template, kind), template)


@pytest.mark.parametrize("kind", KINDS)
def test_llama2_renders_the_tutorial_dialogue_byte_for_byte(kind: str) -> None:
    r = renderer("llama2", kind)
    example = r.render_training(GERMANY, system=None)
    assert r.tokenizer.decode(example.input_ids) == TUTORIAL_DIALOGUE
    prompt = r.render_prompt(GERMANY[:3], system=None, max_prompt_tokens=10_000)
    assert prompt.text == TUTORIAL_DIALOGUE[: len(prompt.text)]
    assert prompt.text.endswith("What about France? [/INST]")
    assert r.tokenizer.decode(prompt.input_ids) == prompt.text


@pytest.mark.parametrize("kind", KINDS)
def test_llama2_first_and_next_generation_prompts_match_the_tutorial(kind: str) -> None:
    r = renderer("llama2", kind)
    first = r.render_prompt([Turn("user", SAN_JOSE)], system=None, max_prompt_tokens=10_000)
    assert first.text == FIRST_PROMPT
    assert r.tokenizer.decode(first.input_ids) == FIRST_PROMPT
    history = [
        Turn("user", SAN_JOSE),
        Turn("assistant", REPLY),
        Turn("user", "I want to optimize for speed."),
    ]
    second = r.render_prompt(history, system=None, max_prompt_tokens=10_000)
    assert second.text == SECOND_PROMPT
    assert r.tokenizer.decode(second.input_ids) == SECOND_PROMPT
    assert second.input_ids[: len(first.input_ids)] == first.input_ids


def test_llama2_system_prompt_goes_inside_the_first_instruction() -> None:
    r = renderer("llama2", "sentencepiece")
    prompt = r.render_prompt(GERMANY[:3], system="Answer like a pirate.", max_prompt_tokens=10_000)
    assert prompt.text == (
        "<s>[INST] <<SYS>>\nAnswer like a pirate.\n<</SYS>>\n\nWhat’s the capital of Germany? [/INST] "
        "The capital of Germany is Berlin.</s><s>[INST] What about France? [/INST]"
    )
    assert r.tokenizer.decode(prompt.input_ids) == prompt.text


def _occurrences(ids: list[int], needle: list[int]) -> list[int]:
    return [i for i in range(len(ids) - len(needle) + 1) if ids[i : i + len(needle)] == needle]


def test_structural_tokens_sit_exactly_where_the_template_puts_them() -> None:
    r = renderer("llama2", "sentencepiece")
    ids = r.render_training(GERMANY, system=None).input_ids
    bos, eos = r.tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    # In this vocabulary [INST] and [/INST] are no single tokens: their token sequences are fixed.
    inst, close = r.plain.encode("[INST]"), r.plain.encode(" [/INST]")
    assert [i for i, t in enumerate(ids) if t == bos] == [0, ids.index(eos) + 1]
    eos_at = [i for i, t in enumerate(ids) if t == eos]
    assert eos_at == [ids.index(eos), len(ids) - 1]
    assert _occurrences(ids, inst) == [1, eos_at[0] + 2]
    closes = _occurrences(ids, close)
    assert len(closes) == 2
    # Each [/INST] is followed by exactly the assistant's words, then </s>.
    for at, answer, end in zip(closes, [GERMANY[1], GERMANY[3]], eos_at, strict=True):
        assert ids[at + len(close) : end] == r.plain.encode(" " + answer.content)


def test_single_token_inst_markers_are_taken_by_id_and_never_from_text() -> None:
    tok = with_special_tokens(sentencepiece_tokenizer(), "[INST]", "[/INST]")
    r = ChatRenderer(tok, "llama2")
    inst, close = tok.convert_tokens_to_ids(["[INST]", "[/INST]"])
    turns = [Turn("user", "say [INST] and [/INST]"), Turn("assistant", "[/INST][INST]"), Turn("user", "ok")]
    prompt = r.render_prompt(turns, system=None, max_prompt_tokens=10_000)
    ids = prompt.input_ids
    bos = tok.convert_tokens_to_ids("<s>")
    assert [i for i, t in enumerate(ids) if t == inst] == [i + 1 for i, t in enumerate(ids) if t == bos]
    assert ids.count(close) == 2
    assert prompt.text.startswith("<s>[INST] say [INST] and [/INST] [/INST] [/INST][INST]</s>")
    assert tok.decode(ids) == prompt.text


def test_chatml_format() -> None:
    r = renderer("chatml", "byte_level")
    prompt = r.render_prompt(GERMANY[:3], system="Be brief.", max_prompt_tokens=10_000)
    assert prompt.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat’s the capital of Germany?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of Germany is Berlin.<|im_end|>\n"
        "<|im_start|>user\nWhat about France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert r.tokenizer.decode(prompt.input_ids) == prompt.text
    assert r.end_of_turn_ids[0] == r.tokenizer.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("system", [None, "You are terse.", "  padded \n"])
def test_model_template_text_equals_apply_chat_template(kind: str, system: str | None) -> None:
    r = renderer("model", kind)
    assert r.mode == "segments" and r.prefix_stable and not r.notes
    turns = [
        Turn("user", "  Hi there \n"),
        Turn("assistant", " Hello! "),
        Turn("user", "two\nlines 😀"),
        Turn("assistant", ""),
        Turn("user", "What’s next?"),
    ]
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": t.role, "content": t.content} for t in turns
    ]
    prompt = r.render_prompt(turns, system=system, max_prompt_tokens=10_000)
    expected = r.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.text == expected
    assert r.tokenizer.decode(prompt.input_ids) == expected
    training = r.render_training(turns[:4], system=system)
    expected = r.tokenizer.apply_chat_template(messages[:-1], tokenize=False)
    assert r.tokenizer.decode(training.input_ids) == expected


def test_model_template_end_of_turn_tokens() -> None:
    smol, llama = renderer("model", "byte_level"), renderer("model", "sentencepiece")
    assert smol.end_of_turn_ids == [smol.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert llama.end_of_turn_ids == [llama.tokenizer.convert_tokens_to_ids("</s>")]


# A Mistral-v0.1-like template: the system prompt is put into the *last* user message, so every new
# turn rewrites an earlier one.
SYSTEM_IN_LAST_USER = (
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{{ '<s>' }}{% for m in msgs %}{% if m['role'] == 'user' %}"
    "{% if loop.last and sys %}{{ '[INST] ' + sys + '\\n\\n' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endif %}"
    "{% else %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
)


def test_a_template_that_rewrites_earlier_turns_is_detected_and_rendered_whole() -> None:
    tok = sentencepiece_tokenizer()
    tok.chat_template = SYSTEM_IN_LAST_USER
    r = ChatRenderer(tok, "model")
    assert r.mode == "full" and not r.prefix_stable
    assert any("rewrites earlier turns" in note for note in r.notes)
    turns = [*GERMANY[:3], Turn("assistant", "Paris <|im_end|> [/INST]."), Turn("user", "Thanks")]
    messages = [{"role": "system", "content": "S"}] + [{"role": t.role, "content": t.content} for t in turns]
    prompt = r.render_prompt(turns, system="S", max_prompt_tokens=10_000)
    assert prompt.text == tok.apply_chat_template(messages, tokenize=False)
    # Labels stay exact: the assistant contents and their </s>, nothing else.
    example = r.render_training(turns[:4], system="S")
    eos = tok.convert_tokens_to_ids("</s>")
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != -100]
    assert trained == (
        [*r.plain.encode(" " + turns[1].content), eos, *r.plain.encode(" " + turns[3].content), eos]
    )
    # Fitting still drops whole turns from the oldest.
    small = r.render_prompt(turns, system="S", max_prompt_tokens=len(prompt.input_ids) - 1)
    assert small.dropped_turns == 2 and small.text.startswith("<s>[INST] What about France?")


def test_position_dependent_template_falls_back_to_whole_renders() -> None:
    tok = byte_level_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ' ' + loop.index|string + '\\n' "
        "+ m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    r = ChatRenderer(tok, "model")
    assert r.mode == "full" and not r.prefix_stable
    assert any("differently depending on their position" in note for note in r.notes)
    prompt = r.render_prompt(GERMANY[:3], system=None, max_prompt_tokens=10_000)
    messages = [{"role": t.role, "content": t.content} for t in GERMANY[:3]]
    assert prompt.text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_a_template_transforming_contents_is_reported_as_inexact() -> None:
    tok = byte_level_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'].upper() + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    r = ChatRenderer(tok, "model")
    assert any("reproduced inexactly" in note and "HELLO THERE!" in note for note in r.notes)


def test_unknown_template_names_the_choices() -> None:
    with pytest.raises(
        PromptError, match=r"unknown chat template 'vicuna'; choose one of: model, llama2, chatml"
    ):
        ChatRenderer(byte_level_tokenizer(), "vicuna")


@pytest.mark.parametrize(
    ("template", "make", "missing"),
    [
        ("llama2", byte_level_tokenizer, "<s>"),
        ("chatml", sentencepiece_tokenizer, "<|im_start|>"),
    ],
)
def test_structural_token_missing_from_the_vocabulary_is_an_error(
    template: str, make: Any, missing: str
) -> None:
    with pytest.raises(PromptError, match=f"template '{template}' needs the token '{missing}'"):
        ChatRenderer(make(), template)


def test_model_template_writing_a_token_the_vocabulary_lacks_is_an_error() -> None:
    tok = sentencepiece_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}{% endfor %}"
    with pytest.raises(PromptError, match=re.escape("writes '<|im_start|>', which is not a token")):
        ChatRenderer(tok, "model")


def test_model_without_a_chat_template_is_an_error() -> None:
    tok = byte_level_tokenizer()
    tok.chat_template = None
    with pytest.raises(PromptError, match="has no chat template"):
        ChatRenderer(tok, "model")


@pytest.mark.parametrize(("template", "kind"), CASES)
def test_bad_conversations_give_one_clear_error(template: str, kind: str) -> None:
    r = renderer(template, kind)
    u, a = Turn("user", "hi"), Turn("assistant", "hello")
    with pytest.raises(PromptError, match="no user turn"):
        r.render_training([a], system=None)
    with pytest.raises(PromptError, match="no user turn"):
        r.render_prompt([], system=None, max_prompt_tokens=100)
    with pytest.raises(PromptError, match="turn 1: the conversation starts with role 'assistant'"):
        r.render_training([a, u], system=None)
    with pytest.raises(PromptError, match="turn 2: unknown role 'tool'"):
        r.render_training([u, Turn("tool", "x")], system=None)  # type: ignore[arg-type]
    with pytest.raises(PromptError, match="nothing to answer"):
        r.render_prompt([u, a], system=None, max_prompt_tokens=100)
    with pytest.raises(PromptError, match="must be positive"):
        r.render_prompt([u], system=None, max_prompt_tokens=0)


def test_system_turn_after_the_start_is_rejected_by_llama2_only() -> None:
    turns = [Turn("user", "hi"), Turn("assistant", "yo"), Turn("system", "be terse"), Turn("user", "ok")]
    with pytest.raises(
        PromptError, match="turn 3: template 'llama2' does not support a system turn after the start"
    ):
        renderer("llama2", "sentencepiece").render_prompt(turns, system=None, max_prompt_tokens=1000)
    text = renderer("chatml", "byte_level").render_prompt(turns, system=None, max_prompt_tokens=1000).text
    assert "<|im_start|>system\nbe terse<|im_end|>\n<|im_start|>user\nok" in text


def test_roles_must_alternate_where_the_template_demands_it() -> None:
    tok = sentencepiece_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{% if m['role'] == 'user' %}{{ '<s>[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + '</s>' }}{% endif %}{% endfor %}"
    )
    r = ChatRenderer(tok, "model")
    with pytest.raises(
        PromptError, match="turns 1 and 2 are both user: template 'model' needs user and assistant"
    ):
        r.render_prompt([Turn("user", "a"), Turn("user", "b")], system=None, max_prompt_tokens=100)
    # Two user turns in a row are fine where the template allows them.
    prompt = renderer("chatml", "byte_level").render_prompt(
        [Turn("user", "a"), Turn("user", "b")], system=None, max_prompt_tokens=100
    )
    assert prompt.text.count("<|im_start|>user") == 2


def test_leading_system_turn_is_the_system_prompt() -> None:
    r = renderer("llama2", "sentencepiece")
    turns = [Turn("system", "Own prompt."), Turn("user", "hi")]
    prompt = r.render_prompt(turns, system="Persona prompt.", max_prompt_tokens=1000)
    assert prompt.text == "<s>[INST] <<SYS>>\nOwn prompt.\n<</SYS>>\n\nhi [/INST]"
    assert prompt.dropped_turns == 0


def test_template_that_rejects_system_prompts_gets_it_folded_into_the_first_user_turn() -> None:
    tok = byte_level_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    r = ChatRenderer(tok, "model")
    prompt = r.render_prompt([Turn("user", "hi")], system="Be kind.", max_prompt_tokens=1000)
    assert prompt.text == "<|im_start|>user\nBe kind.\n\nhi<|im_end|>\n<|im_start|>assistant\n"
