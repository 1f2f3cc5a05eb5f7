"""`tests/bench/bench_generation.py` finds the base model the way the CLI does, on any machine."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

from bot.basemodel import MARKER
from bot.errors import PersonabotError
from tests.test_worker import lively_model

ROOT = Path(__file__).resolve().parent.parent


def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "bench_generation", ROOT / "tests/bench/bench_generation.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_bench_uses_the_configured_then_the_pulled_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    find_model = bench().find_model
    with pytest.raises(PersonabotError, match="not pulled yet"):
        find_model(None)
    pulled = tmp_path / "data" / "models" / "SmolLM2-135M-Instruct"  # where `personabot model pull` puts it
    lively_model(pulled)
    (pulled / MARKER).write_text("{}")
    assert find_model(None) == pulled
    configured = tmp_path / "elsewhere"
    shutil.copytree(pulled, configured)
    monkeypatch.setenv("PERSONABOT_MODEL__PATH", str(configured))
    assert find_model(None) == configured
    assert find_model(tmp_path / "explicit") == tmp_path / "explicit"
