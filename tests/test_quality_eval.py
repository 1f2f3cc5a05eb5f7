"""`personabot eval` through the real worker path, with scripted backends that misbehave on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.quality.questions import QuestionsError, read_questions
from bot.quality.run import EvalTarget, evaluate
from personas.registry import PersonaRegistry
from tests.fakes.backend import ScriptedBackend, last_user_text

QUESTIONS = [
    '{"id": "de", "turns": [{"ask": "What is the capital of Germany?", "expect": "Berlin"}]}',
    '{"id": "conv", "turns": [{"ask": "Capital of France?", "expect": "Paris"}, '
    '{"ask": "And Italy?", "expect": "Rome"}]}',
]
ANSWERS = {"Germany": "Berlin", "France": "Paris", "Italy": "Rome"}


def answer(prompt: str) -> str:
    question = last_user_text(prompt)
    city = next((c for k, c in ANSWERS.items() if k in question), "I do not know")
    return f"The answer is {city}."


@pytest.fixture
def questions(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(QUESTIONS) + "\n")
    return read_questions(path)


def registry() -> PersonaRegistry:
    return PersonaRegistry.discover(None, entry_points=False, builtin=True)


async def run(backend: ScriptedBackend, questions, *, group: bool = False, persona: str = "assistant"):  # type: ignore[no-untyped-def]
    reg = registry()
    settings = load_settings(worker={"poll_seconds": 0.01, "retry_backoff_seconds": 0})
    return await evaluate(settings, reg, backend, EvalTarget(reg.get(persona)), questions, group=group)


async def test_a_sound_backend_scores_full_accuracy_and_no_loops(questions) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend(answer)
    report = await run(backend, questions)
    assert report.questions == 3
    assert report.scores["accuracy"] == 1.0
    assert report.scores["loop_rate"] == 0.0 and report.scores["drift_rate"] == 0.0
    # The continuing conversation's second question was asked with the first exchange in the prompt.
    assert any("Capital of France?" in p and "And Italy?" in p for p in backend.prompts)
    assert json.loads(json.dumps(report.to_json()))["scores"]["accuracy"] == 1.0


async def test_a_looping_backend_is_caught(questions) -> None:  # type: ignore[no-untyped-def]
    report = await run(ScriptedBackend(lambda p: "Tokyo is the capital of Japan. " * 30), questions)
    assert report.scores["loop_rate"] == 1.0
    assert report.scores["accuracy"] == 0.0


async def test_a_name_leaking_backend_is_caught_in_group_mode(questions) -> None:  # type: ignore[no-untyped-def]
    backend = ScriptedBackend(lambda p: "Alecilopi: " + answer(p))
    report = await run(backend, questions, group=True)
    assert report.scores["leak_rate"] == 1.0
    # The stored replies were cleaned: the prefix never reaches the next prompt.
    assert all(not r.reply.startswith("Alecilopi") for r in report.replies)
    later = [p for p in backend.prompts if "And Italy?" in p]
    assert later and "Alecilopi" not in later[0]
    # Three speakers took part in the transcript.
    assert all(name in later[0] for name in ("alice", "bob", "carol"))


async def test_a_german_backend_drifts(questions) -> None:  # type: ignore[no-untyped-def]
    report = await run(
        ScriptedBackend(lambda p: "Der Königin der Deutschland ist der deutsche Capital!"), questions
    )
    assert report.scores["drift_rate"] == 1.0


async def test_reports_repeat_with_the_same_seed(questions, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = await run(ScriptedBackend(answer), questions)
    second = await run(ScriptedBackend(answer), questions)
    assert first.to_json() == second.to_json()
    data, table = first.write(tmp_path / "out")
    assert json.loads(data.read_text())["persona"] == "assistant"
    assert "| accuracy |" in table.read_text()


def test_style_is_scored_for_a_persona_with_a_style_check(questions) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    report = asyncio.run(run(ScriptedBackend(lambda p: "Arr, " + answer(p)), questions, persona="pirate"))
    assert report.scores["style"] == 1.0


def test_a_bad_question_file_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(QUESTIONS[0] + '\n{"id": "x", "turns": [{"ask": "hi", "expect": "("}]}\n')
    with pytest.raises(QuestionsError, match=r"bad.jsonl:2: turns\[0\].expect: not a regex"):
        read_questions(path)


def test_the_shipped_set_has_at_least_60_questions_some_in_conversations() -> None:
    conversations = read_questions()
    assert sum(len(c.turns) for c in conversations) >= 60
    assert any(len(c.turns) == 1 for c in conversations) and any(len(c.turns) >= 3 for c in conversations)


def test_the_eval_command_runs_the_tiny_model_and_writes_its_report(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.tiny import save_tiny_model

    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(QUESTIONS) + "\n")
    env = {
        **os.environ,
        "PERSONABOT_DATA_DIR": str(tmp_path / "data"),
        "PERSONABOT_MODEL__PATH": str(save_tiny_model(tmp_path / "model")),
    }
    command = [sys.executable, "-m", "bot.cli", "eval", "assistant", "--questions", str(questions)]
    proc = subprocess.run(
        [*command, "--out", str(tmp_path / "out"), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["questions"] == 3 and report["version"] is None
    assert set(report["scores"]) >= {"accuracy", "loop_rate", "guard_cut_rate", "drift_rate", "distinct_2"}
    assert json.loads((tmp_path / "out" / "eval.json").read_text()) == report
    bad = subprocess.run(
        [*command[:-2], "--questions", str(tmp_path / "none.jsonl")], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and "none.jsonl: cannot read" in bad.stderr
