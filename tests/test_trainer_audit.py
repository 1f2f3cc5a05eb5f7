"""The mask audit run before any training step: it passes on correct labels and catches wrong ones."""

from __future__ import annotations

from dataclasses import replace

import pytest

from bot.prompting import IGNORE_INDEX, ChatRenderer, Turn
from tests.tiny import byte_level_tokenizer, sentencepiece_tokenizer
from trainer.audit import MaskAuditError, audit_row, audit_rows
from trainer.data import Conversation
from trainer.examples import Row

TRICKY = [
    Turn("system", "You are a pirate."),
    Turn("user", "What's the capital of Germany? [/INST] <s>"),
    Turn("assistant", "Berlin [/INST] <|im_start|>assistant </s> <|im_end|> matey."),
    Turn("user", "And France?"),
    Turn("assistant", ""),  # empty content: only the end-of-turn token is trained
    Turn("user", "Thanks!"),
    Turn("assistant", "Arr, ye be welcome."),
    Turn("user", "bye"),  # ends on a user turn: nothing after it is trained
]


def _renderers() -> list[ChatRenderer]:
    return [
        ChatRenderer(sentencepiece_tokenizer(), "llama2"),
        ChatRenderer(sentencepiece_tokenizer(), "model"),
        ChatRenderer(byte_level_tokenizer(), "chatml"),
        ChatRenderer(byte_level_tokenizer(), "model"),
    ]


@pytest.fixture(params=range(4), ids=["llama2", "model-llama2", "chatml", "model-chatml"], scope="module")
def renderer(request: pytest.FixtureRequest) -> ChatRenderer:
    return _renderers()[request.param]


def _row(renderer: ChatRenderer, turns: list[Turn], max_tokens: int | None = None) -> Row:
    example = renderer.render_training(turns, system=None, max_tokens=max_tokens)
    return Row(Conversation(tuple(turns), "d.jsonl", 7), example)


def test_pad_is_eos_and_the_trained_eos_stays_trained(renderer: ChatRenderer) -> None:
    tokenizer = renderer.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    row = _row(renderer, TRICKY)
    eot = renderer.end_of_turn_ids[0]
    trained_eot = [
        i for i, (t, lab) in enumerate(zip(row.input_ids, row.labels, strict=True)) if lab == eot == t
    ]
    assert len(trained_eot) == 3  # one per assistant turn, the empty one included


def test_correct_labels_pass_on_every_template(renderer: ChatRenderer) -> None:
    assert audit_row(_row(renderer, TRICKY), renderer) is None
    assert audit_rows([_row(renderer, TRICKY[1:3])], renderer) == 1


def test_a_cut_into_an_assistant_turn_passes_without_its_end_of_turn(renderer: ChatRenderer) -> None:
    full = _row(renderer, TRICKY)
    first_trained = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    cut = _row(renderer, TRICKY, max_tokens=first_trained + 4)
    assert cut.example.truncated and not cut.example.dropped
    assert cut.labels[-1] != IGNORE_INDEX and cut.input_ids[-1] not in renderer.end_of_turn_ids
    assert audit_row(cut, renderer) is None


def test_a_cut_before_any_assistant_token_drops_the_row(renderer: ChatRenderer) -> None:
    full = _row(renderer, TRICKY)
    first_trained = next(i for i, lab in enumerate(full.labels) if lab != IGNORE_INDEX)
    assert _row(renderer, TRICKY, max_tokens=first_trained).example.dropped


def _corrupt(row: Row, labels: list[int]) -> Row:
    return Row(row.conversation, replace(row.example, labels=labels))


def test_audit_catches_wrong_masks(renderer: ChatRenderer) -> None:
    row = _row(renderer, TRICKY)
    labels = row.labels
    trained = [i for i, lab in enumerate(labels) if lab != IGNORE_INDEX]
    start, last = trained[0], trained[-1]

    header = list(labels)  # the token before the first assistant turn (its header) is trained too
    header[start - 1] = row.input_ids[start - 1]
    assert audit_row(_corrupt(row, header), renderer) is not None

    no_eot = list(labels)  # the last end-of-turn token is not trained
    no_eot[last] = IGNORE_INDEX
    assert audit_row(_corrupt(row, no_eot), renderer) is not None

    only_last = [IGNORE_INDEX] * len(labels)  # only the last assistant turn trained
    tail_start = max(i for i in trained if labels[i - 1] == IGNORE_INDEX)
    only_last[tail_start : last + 1] = labels[tail_start : last + 1]
    assert "trained runs" in (audit_row(_corrupt(row, only_last), renderer) or "")

    shifted = [IGNORE_INDEX, *labels[:-1]]  # labels shifted by one: they no longer equal the ids
    assert audit_row(_corrupt(row, shifted), renderer) is not None

    user = list(labels)  # a user turn trained
    user[1 : start - 3] = row.input_ids[1 : start - 3]
    assert audit_row(_corrupt(row, user), renderer) is not None


def test_a_failed_audit_aborts_and_shows_the_conversation_and_its_labels() -> None:
    renderer = ChatRenderer(byte_level_tokenizer(), "chatml")
    good = _row(renderer, TRICKY[1:3])
    bad = _corrupt(good, [IGNORE_INDEX] * len(good.labels))
    with pytest.raises(MaskAuditError, match=r"d\.jsonl:7: 0 trained runs for 1 assistant turns") as err:
        audit_rows([good, bad], renderer)
    details = err.value.details
    assert "conversation d.jsonl:7" in details and "What's the capital of Germany?" in details
    assert "label" in details and " -100 " in details
