"""Reading training data and `personabot dataset check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.cli import main
from bot.prompting import ChatRenderer, Turn
from tests.tiny import byte_level_tokenizer, save_tiny_model, sentencepiece_tokenizer
from trainer.data import LineError, dataset_sha256, parse_line, parse_raw_line, read_conversations
from trainer.prepare import check_dataset

TUTORIAL = (
    "<s>[INST] What’s the capital of Germany? [/INST] The capital of Germany is Berlin.</s>"
    "<s>[INST] What about France? [/INST] The capital of France is Paris.</s>"
)


def _jsonl(*conversations: list[dict[str, str]]) -> str:
    return "".join(json.dumps({"messages": c}) + "\n" for c in conversations)


GOOD = [
    {"role": "user", "content": "What's the capital of Germany?"},
    {"role": "assistant", "content": "Berlin."},
]


def test_tutorial_format_becomes_turns() -> None:
    turns = parse_raw_line(TUTORIAL)
    assert turns == [
        Turn("user", "What’s the capital of Germany?"),
        Turn("assistant", "The capital of Germany is Berlin."),
        Turn("user", "What about France?"),
        Turn("assistant", "The capital of France is Paris."),
    ]


def test_tutorial_format_with_system_prompt_and_open_last_turn() -> None:
    turns = parse_raw_line(
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello</s><s>[INST] Bye [/INST]"
    )
    assert turns == [
        Turn("system", "Be brief."),
        Turn("user", "Hi"),
        Turn("assistant", "Hello"),
        Turn("user", "Bye"),
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"text": "hi"}', '"messages" list'),
        ('{"messages": []}', "empty conversation"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "messages.0: unknown role 'bot'"),
        ('{"messages": [{"role": "user", "content": 3}]}', "messages.0: content must be a string"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ("<s>[INST] only a question [/INST]", "no assistant turn"),
        ("<s>[INST] q [/INST] a</s> trailing junk", r"expected <s>\[INST\] .* at column 26"),
        ("hello there", "neither a JSON object"),
    ],
)
def test_bad_lines_say_why(line: str, message: str) -> None:
    with pytest.raises(LineError, match=message):
        parse_line(line)


def test_read_conversations_names_file_and_line_and_keeps_going(tmp_path: Path) -> None:
    data = tmp_path / "mixed.jsonl"
    data.write_text(_jsonl(GOOD) + "\n{broken\n" + TUTORIAL + "\n" + '{"messages": []}\n', encoding="utf-8")
    conversations, problems = read_conversations([data, tmp_path / "missing.jsonl"])
    assert [c.line for c in conversations] == [1, 4]
    assert [(p.line, p.message.split(":")[0]) for p in problems] == [
        (3, "invalid JSON"),
        (5, "empty conversation"),
        (0, "file not found"),
    ]
    assert problems[0].file.endswith("mixed.jsonl")
    assert dataset_sha256([data]) != dataset_sha256([data, data])


def test_check_counts_tokens_and_flags_template_order(tmp_path: Path) -> None:
    tokenizer = sentencepiece_tokenizer()
    renderer = ChatRenderer(tokenizer, "llama2")
    data = tmp_path / "d.jsonl"
    greets_first = [GOOD[1], *GOOD]  # llama2 needs the user to speak first
    data.write_text(_jsonl(GOOD, greets_first, GOOD) + TUTORIAL + "\n", encoding="utf-8")
    stats = check_dataset([data], renderer, system=None, max_seq_len=512)
    assert stats.conversations == 3
    assert [(e.line, "needs a user turn first" in e.message) for e in stats.errors] == [(2, True)]
    good = [c for c in read_conversations([data])[0] if c.line != 2]
    expected = [renderer.render_training(c.turns, system=None) for c in good]
    assert stats.tokens == sum(len(e.input_ids) for e in expected)
    assert stats.trained_tokens == sum(sum(1 for v in e.labels if v != -100) for e in expected)


def test_check_counts_cut_and_dropped_rows(tmp_path: Path) -> None:
    renderer = ChatRenderer(byte_level_tokenizer(), "chatml")
    long_question = [{"role": "user", "content": "hello world " * 40}, {"role": "assistant", "content": "ok"}]
    long_answer = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "the quick brown fox " * 40},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text(_jsonl(long_question, long_answer, GOOD), encoding="utf-8")
    stats = check_dataset([data], renderer, system=None, max_seq_len=64)
    assert (stats.conversations, stats.dropped, stats.truncated) == (3, 1, 1)
    assert stats.tokens <= 2 * 64 and not stats.errors


@pytest.fixture
def model_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = save_tiny_model(tmp_path / "tiny-model")
    monkeypatch.setenv("PERSONABOT_MODEL__PATH", str(folder))
    return folder


def test_cli_json_report_and_exit_code(
    model_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(_jsonl(GOOD, GOOD), encoding="utf-8")
    assert main(["dataset", "check", str(good), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"conversations", "tokens", "trained_tokens", "dropped", "truncated", "errors"}
    assert report["conversations"] == 2 and report["trained_tokens"] > 0 and report["errors"] == []

    bad = tmp_path / "bad.jsonl"
    bad.write_text(_jsonl(GOOD) + '{"messages": [{"role": "narrator", "content": "x"}]}\n', encoding="utf-8")
    assert main(["dataset", "check", str(good), str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["conversations"] == 3
    assert report["errors"] == [
        {"file": report["errors"][0]["file"], "line": 2, "message": report["errors"][0]["message"]}
    ]
    assert report["errors"][0]["file"].endswith("bad.jsonl")
    assert "unknown role 'narrator'" in report["errors"][0]["message"]


def test_cli_text_report_on_a_persona(model_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dataset", "check", "--persona", "poet", "--max-seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "conversations   276" in out and "errors          0" in out


def test_cli_needs_files_or_a_persona(model_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dataset", "check"]) == 2
    assert "give dialogue FILEs" in capsys.readouterr().err
