"""Fitting the context window, and incremental rendering with a per-channel cache."""

from __future__ import annotations

import pytest

from bot.prompting import TRUNCATION_MARKER, ChatRenderer, PromptCache, PromptError, Turn
from tests.test_prompting_templates import CASES, renderer


def chat(n: int) -> list[Turn]:
    """`n` exchanges and a final question; contents of different lengths."""
    turns: list[Turn] = []
    for i in range(n):
        turns.append(Turn("user", f"question {i}: " + "why " * (i % 4 + 1)))
        turns.append(Turn("assistant", f"answer {i}: " + "because " * (i % 3 + 1)))
    turns.append(Turn("user", "and finally?"))
    return turns


def unlimited(r: ChatRenderer, turns: list[Turn], system: str | None) -> list[int]:
    return r.render_prompt(turns, system=system, max_prompt_tokens=10**9).input_ids


@pytest.mark.parametrize(("template", "kind"), CASES)
def test_drops_whole_turns_oldest_first_and_keeps_the_system_prompt(template: str, kind: str) -> None:
    r = renderer(template, kind)
    turns, system = chat(6), "You are the system prompt."
    full = unlimited(r, turns, system)
    for budget in range(len(full), 0, -7):
        try:
            fitted = r.render_prompt(turns, system=system, max_prompt_tokens=budget)
        except PromptError:
            break
        assert len(fitted.input_ids) <= budget
        if fitted.truncated:
            continue
        kept = turns[fitted.dropped_turns :]
        assert kept[0].role == "user", "the kept conversation starts with a user turn"
        # The fitted prompt is exactly the unfitted prompt of the kept turns, system prompt included.
        assert fitted.input_ids == unlimited(r, kept, system)
        assert "You are the system prompt." in fitted.text
        # ...and it is the longest such suffix: starting at the previous user turn would not fit.
        earlier = [i for i in range(fitted.dropped_turns) if turns[i].role == "user"]
        if earlier:
            assert len(unlimited(r, turns[earlier[-1] :], system)) > budget


def test_reports_dropped_turns() -> None:
    r = renderer("model", "byte_level")
    turns = chat(4)
    keep_last_exchange = len(unlimited(r, turns[-3:], None))
    fitted = r.render_prompt(turns, system=None, max_prompt_tokens=keep_last_exchange)
    assert fitted.dropped_turns == len(turns) - 3 and not fitted.truncated
    assert fitted.text.startswith("<|im_start|>system\nYou are a helpful AI")  # SmolLM's default system


def test_llama2_moves_the_system_prompt_into_the_new_first_instruction() -> None:
    r = renderer("llama2", "sentencepiece")
    turns = chat(3)
    budget = len(unlimited(r, turns[-3:], "Sys."))
    fitted = r.render_prompt(turns, system="Sys.", max_prompt_tokens=budget)
    assert fitted.dropped_turns == 4
    assert fitted.text.startswith("<s>[INST] <<SYS>>\nSys.\n<</SYS>>\n\nquestion 2:")


@pytest.mark.parametrize(("template", "kind"), CASES)
def test_an_overlong_newest_message_is_cut_from_its_oldest_part_with_a_marker(
    template: str, kind: str
) -> None:
    r = renderer(template, kind)
    words = " ".join(f"word{i}" for i in range(400))
    turns = [*chat(2)[:-1], Turn("user", words + " THE END")]
    budget = len(unlimited(r, [Turn("user", "x")], "Sys.")) + 40
    fitted = r.render_prompt(turns, system="Sys.", max_prompt_tokens=budget)
    assert fitted.truncated and fitted.dropped_turns == len(turns) - 1
    assert len(fitted.input_ids) <= budget
    assert TRUNCATION_MARKER.strip() in fitted.text and "THE END" in fitted.text
    assert "word0 " not in fitted.text and "Sys." in fitted.text
    assert r.tokenizer.decode(fitted.input_ids) == fitted.text
    # As much of the message as fits is kept: one more token's worth of budget keeps as much or more.
    roomier = r.render_prompt(turns, system="Sys.", max_prompt_tokens=budget + 5)
    assert len(roomier.text) >= len(fitted.text)


def test_a_budget_too_small_for_the_system_prompt_is_an_error() -> None:
    r = renderer("chatml", "byte_level")
    with pytest.raises(PromptError, match="max_prompt_tokens=5 leaves no room for the newest message"):
        r.render_prompt([Turn("user", "hi")], system="A long system prompt " * 5, max_prompt_tokens=5)


class CountingEncoder:
    """Wraps a renderer's plain encoder and records every text it tokenizes."""

    def __init__(self, r: ChatRenderer, monkeypatch: pytest.MonkeyPatch) -> None:
        self.texts: list[str] = []
        original = r.plain.encode

        def encode(text: str) -> list[int]:
            self.texts.append(text)
            return original(text)

        monkeypatch.setattr(r.plain, "encode", encode)


@pytest.mark.parametrize(("template", "kind"), CASES)
def test_with_a_channel_cache_turn_n_tokenizes_only_the_new_turn(
    template: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    r = ChatRenderer(renderer(template, kind).tokenizer, template)
    cache = PromptCache()
    history = chat(20)
    r.render_prompt(history, system="Sys.", max_prompt_tokens=10**6, cache=cache)
    counter = CountingEncoder(r, monkeypatch)
    history = [*history, Turn("assistant", "a brand new answer"), Turn("user", "a brand new question")]
    cached = r.render_prompt(history, system="Sys.", max_prompt_tokens=10**6, cache=cache)
    assert counter.texts and all("brand new" in text for text in counter.texts), counter.texts
    assert len(counter.texts) <= 3  # the answer, the question (and the question as a first turn)
    assert cached == r.render_prompt(history, system="Sys.", max_prompt_tokens=10**6)
    # An edited old message is simply tokenized again.
    counter.texts.clear()
    edited = [history[0], Turn("assistant", "an edited answer"), *history[2:]]
    cached = r.render_prompt(edited, system="Sys.", max_prompt_tokens=10**6, cache=cache)
    assert counter.texts and all("edited" in text for text in counter.texts), counter.texts
    assert cached == r.render_prompt(edited, system="Sys.", max_prompt_tokens=10**6)


def test_a_long_history_costs_only_the_turns_that_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    r = ChatRenderer(renderer("chatml", "byte_level").tokenizer, "chatml")
    history = chat(300)
    budget = len(unlimited(r, history[-5:], None))
    counter = CountingEncoder(r, monkeypatch)
    fitted = r.render_prompt(history, system=None, max_prompt_tokens=budget)
    assert fitted.dropped_turns == len(history) - 5
    assert len(counter.texts) <= 8  # the kept turns and one or two older ones, not 600


def test_channel_caches_are_per_key_and_bounded() -> None:
    r = ChatRenderer(renderer("chatml", "byte_level").tokenizer, "chatml", max_channels=2)
    a, b = r.channel_cache(("discord", "1")), r.channel_cache(("discord", "2"))
    assert a is r.channel_cache(("discord", "1")) and a is not b
    r.channel_cache(("discord", "3"))  # evicts the least recently used channel, "2"
    assert r.channel_cache(("discord", "1")) is a and r.channel_cache(("discord", "2")) is not b


def test_a_cache_filled_by_another_renderer_is_not_reused() -> None:
    cache = PromptCache()
    turns = chat(2)
    chatml = renderer("chatml", "byte_level")
    smol = renderer("model", "byte_level")
    chatml.render_prompt(turns, system=None, max_prompt_tokens=10**6, cache=cache)
    assert smol.render_prompt(turns, system=None, max_prompt_tokens=10**6, cache=cache) == smol.render_prompt(
        turns, system=None, max_prompt_tokens=10**6
    )
