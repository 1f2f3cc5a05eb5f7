"""The loop guard and text stop sequences: pure detection, and the engine ending a row with them."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from bot.generation.base import GenerationRequest
from bot.generation.engine import BatchEngine
from bot.generation.guard import cut_before, first_stop, loop_start
from bot.replies import clean_reply, speaker_prefix, speaker_stops
from personas.spec import Sampling
from tests.tiny import byte_level_tokenizer, tiny_llama

GREEDY = Sampling(temperature=0.0, repetition_penalty=1.0, max_new_tokens=120)


def guarded(text: str) -> str | None:
    start = loop_start(text)
    return None if start is None else cut_before(text, start)


def test_a_sentence_said_three_times_is_cut_after_its_first_time() -> None:
    reply = "The capital of Japan is Tokyo. " + "Tokyo is the capital of Japan. " * 3
    assert guarded(reply) == "The capital of Japan is Tokyo. Tokyo is the capital of Japan."


def test_a_word_run_repeated_without_punctuation_is_a_loop() -> None:
    assert guarded("the cat sat on the mat and then " * 3) == "the cat sat on the mat and then"


def test_lines_repeat_too_and_the_cut_keeps_whole_lines() -> None:
    assert guarded("Line one\nLine two\nLine two\nLine two\n") == "Line one\nLine two"


@pytest.mark.parametrize(
    "reply",
    [
        "Berlin is the capital of Germany. It is a large city with many museums.",
        "Yes. Paris is lovely. Yes, really.",
        "Soft rain on the roof\nthe kettle begins to sing\nmorning finds its voice",
        "1. Add flour to the bowl.\n2. Add sugar to the bowl.\n3. Add eggs to the bowl.",
    ],
)
def test_ordinary_replies_are_not_loops(reply: str) -> None:
    assert loop_start(reply) is None


def test_a_sentence_still_being_written_does_not_count_yet() -> None:
    assert loop_start("Go on. Go on. Go on") is None
    assert loop_start("Go on. Go on. Go on.") is not None


def test_stop_texts_are_found_from_where_the_last_check_left_off() -> None:
    assert first_stop("Sure thing.\nalice: and you?", ("\nalice:", "\nbob:")) == len("Sure thing.")
    assert first_stop("no stop here", ("\nalice:",)) is None
    # A stop text that straddles the previous check's end is still found.
    assert first_stop("ok\nali" + "ce: x", ("\nalice:",), since=len("ok\nali")) == 2


def test_speaker_prefixes_are_recognised_and_stripped_in_groups_only() -> None:
    assert speaker_prefix("Alecilopi: Berlin is the capital.") == "Alecilopi"
    assert speaker_prefix("**Captain Saltbeard**: Arr!") == "Captain Saltbeard"
    assert speaker_prefix("Ingredients:\n- flour") is None
    assert speaker_prefix("See https://example.org: it helps") is None
    assert clean_reply("bob: alice: hi there", group=True).text == "hi there"
    assert clean_reply("bob: hi there", group=True).stripped_prefix == "bob"
    assert clean_reply("Note: hi there", group=False).text == "Note: hi there"
    assert speaker_stops(["bob", "alice", "", "bob"]) == ("\nalice:", "\nbob:")


class Scripted:
    """Replaces the sampler: the engine decodes a fixed token sequence whatever the logits say."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.step = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        outer = self

        class Sampler:
            def __call__(self, logits: torch.Tensor) -> torch.Tensor:
                token = outer.ids[min(outer.step, len(outer.ids) - 1)]
                outer.step += 1
                return torch.full((logits.shape[0],), token, dtype=torch.long)

            def observe(self, tokens: torch.Tensor) -> None:
                pass

            def keep_rows(self, index: list[int]) -> None:
                pass

        return Sampler()


@pytest.fixture(scope="module")
def engine() -> BatchEngine:
    tok = byte_level_tokenizer()
    return BatchEngine(tiny_llama(tok), tok)


def test_the_engine_ends_a_looping_row_at_the_last_sentence_before_the_loop(
    engine: BatchEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = engine.tokenizer
    text = "Tokyo is the capital of Japan." + " Tokyo is the capital of Japan." * 20
    monkeypatch.setattr("bot.generation.engine.BatchSampler", Scripted(tok(text)["input_ids"]))
    request = GenerationRequest(tok("hello world")["input_ids"], GREEDY, stop_ids=())
    [result] = engine.generate([request])
    assert result.finish_reason == "loop"
    assert result.text == "Tokyo is the capital of Japan."
    # It stopped as soon as the third copy was complete, not at max_new_tokens.
    assert len(result.token_ids) < len(tok(text)["input_ids"]) // 4


def test_the_engine_stops_before_a_speaker_line(engine: BatchEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = engine.tokenizer
    text = "Paris, of course.\nalice: thanks!\nbob: what about Italy?"
    monkeypatch.setattr("bot.generation.engine.BatchSampler", Scripted(tok(text)["input_ids"]))
    request = GenerationRequest(
        tok("hello world")["input_ids"], GREEDY, stop_ids=(), stop_texts=("\nalice:",)
    )
    [result] = engine.generate([request])
    assert (result.finish_reason, result.text) == ("stop", "Paris, of course.")
