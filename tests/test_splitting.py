"""The shared long-reply splitter: limits, boundaries, code fences, and nothing lost."""

from __future__ import annotations

import re

from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from adapters.splitting import open_fence, split_text, utf16_len

FENCE_LINE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*$")

words = st.text(
    alphabet=st.sampled_from("abcdefghijklmnopqrstuvwxyzÅé日本שלוםمرحبا😀👍🏽\u0301\u200d\u200b"),
    min_size=1,
    max_size=12,
)
punctuation = st.sampled_from(["", "", "", ".", "!", "?", ",", '."', "…"])
separators = st.sampled_from([" ", " ", " ", " ", "\n", "\n\n", "  ", "\t", "\n\n\n"])
fence_lines = st.sampled_from(["```", "```python", "~~~", "````", "```js"])


@st.composite
def markdownish(draw: st.DrawFn) -> str:
    """Words, sentences, paragraphs and fenced code blocks, some of them unclosed."""
    parts: list[str] = []
    for _ in range(draw(st.integers(1, 60))):
        if draw(st.integers(0, 12)) == 0:
            parts.append("\n" + draw(fence_lines) + "\n")
        else:
            parts.append(draw(words) + draw(punctuation) + draw(separators))
    return "".join(parts)


def non_fence_content(text: str) -> str:
    """Non-whitespace text outside fence lines: what splitting must keep, in order."""
    kept = [line for line in text.split("\n") if not FENCE_LINE.match(line)]
    return re.sub(r"\s+", "", "\n".join(kept))


def check_chunks(text: str, chunks: list[str], limit: int, measure=len) -> None:  # type: ignore[no-untyped-def]
    for chunk in chunks:
        assert chunk.strip(), chunks
        assert measure(chunk) <= limit, (measure(chunk), chunk)
    # Every chunk but the last closes what it opens, so each renders on its own.
    for chunk in chunks[:-1]:
        assert open_fence(chunk) is None, chunk
    assert non_fence_content("".join(c + "\n" for c in chunks)) == non_fence_content(text)


@settings(max_examples=150, deadline=None)
@given(text=markdownish(), limit=st.integers(40, 400))
@example(text="a" * 2000, limit=2000)
@example(text="```py\n" + "x = 1\n" * 500 + "```", limit=2000)
def test_chunks_fit_keep_everything_and_balance_fences(text: str, limit: int) -> None:
    check_chunks(text, split_text(text, limit), limit)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=3000), limit=st.integers(8, 300))
def test_arbitrary_text_never_breaks_the_splitter(text: str, limit: int) -> None:
    chunks = split_text(text, limit)
    for chunk in chunks:
        assert chunk.strip() and len(chunk) <= limit
    assert re.sub(r"\s+", "", "".join(chunks)).replace("`", "").replace("~", "") == re.sub(
        r"\s+", "", text
    ).replace("`", "").replace("~", "")


@settings(max_examples=100, deadline=None)
@given(text=markdownish(), limit=st.integers(40, 400))
def test_utf16_measure_for_telegram(text: str, limit: int) -> None:
    check_chunks(text, split_text(text, limit, measure=utf16_len), limit, measure=utf16_len)


@settings(max_examples=100, deadline=None)
@given(
    paragraphs=st.lists(st.lists(words, min_size=1, max_size=15).map(" ".join), min_size=1, max_size=30),
    limit=st.integers(200, 600),
)
def test_whole_paragraphs_when_each_fits(paragraphs: list[str], limit: int) -> None:
    paragraphs = [p.strip() for p in paragraphs if p.strip()]
    assume(paragraphs and all(len(p) <= limit for p in paragraphs))
    chunks = split_text("\n\n".join(paragraphs), limit)
    # Each chunk is a run of consecutive whole paragraphs.
    assert [p for c in chunks for p in c.split("\n\n")] == paragraphs


@settings(max_examples=100, deadline=None)
@given(sentences=st.lists(st.lists(words, min_size=1, max_size=8), min_size=2, max_size=40))
def test_sentences_then_words_when_a_paragraph_is_too_long(sentences: list[list[str]]) -> None:
    text = " ".join(" ".join(ws) + "." for ws in sentences)
    limit = 120
    chunks = split_text(text, limit)
    check_chunks(text, chunks, limit)
    # No word is ever cut (every word is far below the limit).
    assert " ".join(chunks).split() == text.split()
    # A chunk ends mid-sentence only when the sentence alone is longer than the limit.
    fits = [len(" ".join(ws) + ".") <= limit for ws in sentences]
    if all(fits):
        assert all(c.endswith(".") for c in chunks)


def test_short_text_is_one_stripped_message_and_blank_text_none() -> None:
    assert split_text("  hello  \n", 2000) == ["hello"]
    assert split_text("x" * 2000, 2000) == ["x" * 2000]
    assert split_text(" \n\t\u3000", 2000) == []


def test_paragraph_beats_sentence_beats_word() -> None:
    text = "First sentence. Second one here.\n\nNext paragraph is here."
    assert split_text(text, 40) == ["First sentence. Second one here.", "Next paragraph is here."]
    assert split_text("One two three. Four five six seven", 25) == ["One two three.", "Four five six seven"]
    assert split_text("alpha beta gamma delta", 12) == ["alpha beta", "gamma delta"]


def test_code_block_is_closed_and_reopened_with_its_language() -> None:
    code = "\n".join(f"    line_{i} = {i}" for i in range(30))
    text = f"Here you go:\n```python\n{code}\n```\nDone."
    chunks = split_text(text, 200)
    assert len(chunks) > 2
    assert chunks[0].startswith("Here you go:")
    for chunk in chunks[1:-1]:
        assert chunk.startswith("```python\n") and chunk.endswith("\n```")
    # Indentation inside the code survives the cut.
    assert all(line.startswith("    line_") for c in chunks for line in c.split("\n") if "line_" in line)
    assert chunks[-1].endswith("Done.")
    rejoined = [line for c in chunks for line in c.split("\n") if "line_" in line]
    assert rejoined == code.split("\n")


def test_a_word_longer_than_the_limit_is_cut_but_not_inside_a_combining_sequence() -> None:
    text = "e\u0301" * 30  # 60 code points, 30 visible characters
    chunks = split_text(text, 25)
    assert "".join(chunks) == text
    assert all(not c.startswith("\u0301") for c in chunks)
    family = "👨\u200d👩\u200d👧" * 5
    chunks = split_text(family, 7)
    assert "".join(chunks) == family
    assert all(not c.startswith("\u200d") and not c.endswith("\u200d") for c in chunks)


def test_utf16_counts_astral_characters_twice() -> None:
    assert utf16_len("a😀") == 3
    chunks = split_text("😀" * 10, 8, measure=utf16_len)
    assert chunks == ["😀" * 4, "😀" * 4, "😀" * 2]
