"""The tutorial's masked loss: labels from `render_training` for llama2, chatml and a model's own template.

Every label is -100 except each assistant turn's content and that turn's end-of-turn token (`</s>`,
`<|im_end|>`, the model template's), for every assistant turn; truncation keeps the start.
"""

from __future__ import annotations

import pytest

from bot.prompting import IGNORE_INDEX, ChatRenderer, TrainingExample, Turn
from tests.test_prompting_templates import GERMANY, renderer

# llama2 and chatml on the tokenizers built for them; the model's own template on both tiny tokenizers
# (the byte-level one carries SmolLM2's ChatML template, the SentencePiece one Llama-2's, which strips).
LABEL_CASES = [
    ("llama2", "sentencepiece"),
    ("chatml", "byte_level"),
    ("model", "byte_level"),
    ("model", "sentencepiece"),
]
SYSTEM = "You answer in one short sentence."


def runs(labels: list[int]) -> list[tuple[int, int]]:
    """The (start, end) ranges of trained labels."""
    found, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            found.append((start, i))
            start = None
    return found


def trained_texts(r: ChatRenderer, example: TrainingExample) -> list[str]:
    """What each trained range spells, decoded in context (so SentencePiece spaces come out right)."""
    texts = []
    for start, end in runs(example.labels):
        before = r.tokenizer.decode(example.input_ids[:start])
        upto = r.tokenizer.decode(example.input_ids[:end])
        assert upto.startswith(before)
        texts.append(upto[len(before) :])
    return texts


def check_mask(r: ChatRenderer, example: TrainingExample, answers: list[str]) -> None:
    """The labels train exactly the answers, each with its end-of-turn token, and nothing else."""
    assert len(example.labels) == len(example.input_ids)
    assert runs(example.labels) == list(example.spans)
    for i, label in enumerate(example.labels):
        assert label in (IGNORE_INDEX, example.input_ids[i])
    assert trained_texts(r, example) == [r.trained_text(a) for a in answers]
    for start, end in example.spans:
        # <s>, [INST], role headers and the like never sit inside a trained range; only its last token,
        # the end-of-turn token, is structural.
        inside = [t for t in example.input_ids[start:end] if t in r.structural_ids]
        assert inside == [example.input_ids[end - 1]] and inside[0] in r.end_of_turn_ids


def test_trained_text_is_the_content_and_end_of_turn_token() -> None:
    assert renderer("llama2", "sentencepiece").trained_text("Berlin.") == " Berlin.</s>"
    assert renderer("chatml", "byte_level").trained_text("Berlin.") == "Berlin.<|im_end|>"
    assert renderer("model", "byte_level").trained_text("Berlin.") == "Berlin.<|im_end|>"
    # Llama-2's own template strips contents and writes " </s>": the space before </s> is generated too.
    assert renderer("model", "sentencepiece").trained_text(" Berlin. ") == " Berlin. </s>"


def test_llama2_labels_match_the_tutorials_table() -> None:
    r = renderer("llama2", "sentencepiece")
    example = r.render_training(GERMANY, system=None)
    assert trained_texts(r, example) == [
        " The capital of Germany is Berlin.</s>",
        " The capital of France is Paris.</s>",
    ]
    # "...Germany? [/INST]" -> "The": the first trained token comes right after [/INST].
    start = example.spans[0][0]
    assert r.tokenizer.decode(example.input_ids[:start]).endswith("What’s the capital of Germany? [/INST]")


@pytest.mark.parametrize(("template", "kind"), LABEL_CASES)
def test_multi_turn_with_a_system_prompt(template: str, kind: str) -> None:
    r = renderer(template, kind)
    example = r.render_training(GERMANY, system=SYSTEM)
    check_mask(r, example, [GERMANY[1].content, GERMANY[3].content])
    assert not example.truncated and not example.dropped
    # Nothing of the system prompt or the user turns is trained.
    system_ids = r.plain.encode(SYSTEM)
    trained = [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert not set(system_ids) - {t for t in example.input_ids} and len(trained) < len(example.input_ids) / 2


@pytest.mark.parametrize(("template", "kind"), LABEL_CASES)
def test_assistant_text_containing_template_markers(template: str, kind: str) -> None:
    r = renderer(template, kind)
    answers = ["Type [/INST] then <|im_start|>assistant\n to confuse me", "</s><s>[INST] <|im_end|>"]
    turns = [
        Turn("user", "hi"),
        Turn("assistant", answers[0]),
        Turn("user", "[/INST]"),
        Turn("assistant", answers[1]),
    ]
    check_mask(r, r.render_training(turns, system=SYSTEM), answers)


@pytest.mark.parametrize(("template", "kind"), LABEL_CASES)
def test_empty_assistant_content_trains_only_the_end_of_turn(template: str, kind: str) -> None:
    r = renderer(template, kind)
    turns = [
        Turn("user", "say nothing"),
        Turn("assistant", ""),
        Turn("user", "again"),
        Turn("assistant", "ok"),
    ]
    example = r.render_training(turns, system=None)
    check_mask(r, example, ["", "ok"])
    start, end = example.spans[0]
    assert example.input_ids[end - 1] in r.end_of_turn_ids
    # At most the template's space before the content (llama2: " " + "" + "</s>") comes with it.
    assert r.tokenizer.decode(example.input_ids[start : end - 1]).strip() == ""


@pytest.mark.parametrize(("template", "kind"), LABEL_CASES)
def test_conversation_ending_on_a_user_turn(template: str, kind: str) -> None:
    r = renderer(template, kind)
    example = r.render_training(GERMANY[:3], system=SYSTEM)
    check_mask(r, example, [GERMANY[1].content])
    last = example.spans[-1][1]
    assert len(example.input_ids) > last and set(example.labels[last:]) == {IGNORE_INDEX}


@pytest.mark.parametrize(("template", "kind"), LABEL_CASES)
def test_pad_token_equal_to_eos_keeps_the_eos_trained(template: str, kind: str) -> None:
    r = renderer(template, kind)
    tok = r.tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # both tiny tokenizers pad with their eos
    example = r.render_training(GERMANY, system=None)
    eos_labels = [i for i, label in enumerate(example.labels) if label == tok.eos_token_id]
    assert eos_labels == [end - 1 for _, end in example.spans] and len(eos_labels) == 2


@pytest.mark.parametrize(("template", "kind"), LABEL_CASES)
def test_truncation_that_removes_every_assistant_token_drops_the_row(template: str, kind: str) -> None:
    r = renderer(template, kind)
    full = r.render_training(GERMANY, system=SYSTEM)
    cut = r.render_training(GERMANY, system=SYSTEM, max_tokens=full.spans[0][0])
    assert cut.truncated and cut.dropped
    assert cut.input_ids == full.input_ids[: full.spans[0][0]]
    assert set(cut.labels) == {IGNORE_INDEX} and cut.spans == ()


@pytest.mark.parametrize(("template", "kind"), LABEL_CASES)
def test_truncation_into_an_assistant_turn_leaves_its_end_of_turn_untrained(template: str, kind: str) -> None:
    r = renderer(template, kind)
    full = r.render_training(GERMANY, system=SYSTEM)
    start, end = full.spans[1]
    assert end - start > 3
    cut = r.render_training(GERMANY, system=SYSTEM, max_tokens=start + 2)
    assert cut.truncated and not cut.dropped
    assert cut.input_ids == full.input_ids[: start + 2]
    assert cut.labels == full.labels[: start + 2]
    assert cut.spans == (full.spans[0], (start, start + 2))
    # The cut turn's words so far are trained; no end-of-turn token is trained for it.
    trained_eot = [i for i, label in enumerate(cut.labels) if label in r.end_of_turn_ids]
    assert trained_eot == [full.spans[0][1] - 1]


def test_max_tokens_longer_than_the_conversation_changes_nothing() -> None:
    r = renderer("chatml", "byte_level")
    full = r.render_training(GERMANY, system=None)
    same = r.render_training(GERMANY, system=None, max_tokens=len(full.input_ids))
    assert same == full and not same.truncated
