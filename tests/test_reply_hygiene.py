"""What happens to a bad reply: delivered, but left out of later prompts; prefixes stripped in groups."""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import pytest

from bot.chat import run_chat
from bot.config import load_settings
from bot.generation.base import GenerationRequest
from tests.fakes.backend import ScriptedBackend, last_user_text


class LoopCutBackend(ScriptedBackend):
    """Says its first reply was cut by the loop guard, as the engine reports it."""

    def finish_reason(self, prompt_index: int) -> str:
        return "loop" if prompt_index == 0 else "stop"


def stored(data_dir: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(data_dir / "personabot.db") as conn:
        return conn.execute("select role, text, excluded_from_prompts from messages order by id").fetchall()


async def chat(backend: ScriptedBackend, monkeypatch: pytest.MonkeyPatch, text: str) -> str:
    monkeypatch.setattr("bot.chat.load_backend", lambda settings, allow_pull: backend)
    out = io.StringIO()
    await run_chat(load_settings(), stdin=io.StringIO(text), stdout=out, interactive=False)
    return out.getvalue()


async def test_a_drifted_reply_is_delivered_but_left_out_of_later_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def reply(prompt: str) -> str:
        q = last_user_text(prompt).splitlines()[-1]  # the newest message
        return "Der Königin der Deutschland ist der deutsche Capital!" if "Germany" in q else "Paris."

    backend = ScriptedBackend(reply)
    monkeypatch.setenv("PERSONABOT_WORKER__LANGUAGE_RETRIES", "2")
    out = await chat(backend, monkeypatch, "What's the capital of Germany?\nAnd what about France?\n")
    assert "Der Königin" in out  # no attempt was English: the first reply is delivered
    assert len(backend.prompts) == 4  # the first answer, two language retries, the next question
    assert "What's the capital of Germany?" in backend.prompts[3]
    assert "Königin" not in backend.prompts[3]  # but not carried forward
    rows = stored(tmp_path / "data")
    assert [r[2] for r in rows] == [0, 1, 0, 0]


class FrenchFirstBackend(ScriptedBackend):
    """Answers in French unless it samples (as a language retry does), then in English."""

    def __init__(self) -> None:
        super().__init__(lambda prompt: "")
        self.requests: list[GenerationRequest] = []

    def reply_for(self, request: GenerationRequest, prompt: str) -> str:
        self.requests.append(request)
        return "La capitale de la France est Paris." if request.sampling.temperature == 0 else "Paris."


async def test_a_reply_that_drifts_out_of_english_is_generated_again_with_a_fixed_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = FrenchFirstBackend()
    out = await chat(backend, monkeypatch, "What's the capital of France?\nAnd of Italy?\n")
    assert "La capitale" not in out and out.count("Paris.") == 2
    first, retry, _second, second_retry = backend.requests
    assert first.sampling.temperature == 0  # the default persona decodes greedily
    assert retry.sampling.temperature > 0 and retry.prompt_ids == first.prompt_ids
    assert "Italy" in backend.tokenizer.decode(second_retry.prompt_ids)
    rows = stored(tmp_path / "data")
    assert [(r[0], r[1], r[2]) for r in rows][1] == ("assistant", "Paris.", 0)
    with sqlite3.connect(tmp_path / "data" / "personabot.db") as conn:
        assert [r[0] for r in conn.execute("select error from reply_jobs order by id")] == [None, None]


def test_language_retries_are_seeded_when_the_reply_was() -> None:
    from bot.replies import retry_sampling
    from personas.spec import Sampling

    greedy = Sampling(temperature=0.0, top_p=1.0)
    first, second = retry_sampling(greedy, 10, 1), retry_sampling(greedy, 10, 2)
    assert first[0].temperature > 0 and first[1] != second[1] and first == retry_sampling(greedy, 10, 1)
    assert retry_sampling(greedy, None, 1)[1] is None
    warm = Sampling(temperature=0.9, top_p=0.8)
    assert retry_sampling(warm, 3, 1)[0] == warm  # a sampling persona keeps its own settings


async def test_language_retries_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONABOT_WORKER__LANGUAGE_RETRIES", "0")
    backend = FrenchFirstBackend()
    out = await chat(backend, monkeypatch, "What's the capital of France?\n")
    assert "La capitale de la France est Paris." in out and len(backend.requests) == 1


async def test_a_reply_the_loop_guard_cut_is_left_out_and_reset_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = LoopCutBackend(lambda prompt: f"answer to {last_user_text(prompt)}")
    await chat(backend, monkeypatch, "first question\nsecond question\n/reset\nthird question\n")
    assert "answer to first question" not in backend.prompts[1]
    assert "answer to second question" not in backend.prompts[2] and "second" not in backend.prompts[2]
    with sqlite3.connect(tmp_path / "data" / "personabot.db") as conn:
        notes = [r[0] for r in conn.execute("select error from reply_jobs order by id")]
    assert notes[0] == "reply cut by the loop guard; left out of later prompts" and notes[1] is None


def test_group_history_names_earlier_lines_in_brackets_and_gives_the_newest_bare() -> None:
    from datetime import UTC, datetime

    from bot.conversation import history_to_turns
    from bot.prompting import Turn
    from bot.store.conversations import HistoryMessage

    now = datetime.now(UTC)
    history = [
        HistoryMessage(1, "user", "morning all", "alice", None, now),
        HistoryMessage(2, "user", "hey alice", "bob", None, now),
        HistoryMessage(3, "user", "What's the capital of Germany?", "carol", None, now),
    ]
    separate = history_to_turns(history, persona="assistant", group=True, separate_newest=True)
    assert separate == [
        Turn("user", "[alice] morning all\n[bob] hey alice", "alice"),
        Turn("user", "What's the capital of Germany?", "carol"),
    ]
    merged = history_to_turns(history, persona="assistant", group=True)
    assert [t.content for t in merged] == [
        "[alice] morning all\n[bob] hey alice\nWhat's the capital of Germany?"
    ]
    # Up to an earlier message, that one is the newest.
    earlier = history_to_turns(
        history, persona="assistant", group=True, up_to_message_id=2, separate_newest=True
    )
    assert [t.content for t in earlier] == ["[alice] morning all", "hey alice"]
    # Direct chats are unchanged.
    assert [t.content for t in history_to_turns(history, persona="assistant", group=False)] == [
        "morning all\nhey alice\nWhat's the capital of Germany?"
    ]
