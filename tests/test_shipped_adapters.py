"""The shipped pirate and poet adapters, on the real SmolLM2 (slow): their recorded held-out loss is
reproduced, and a fresh install answers the tutorial's first question in English."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.scheduler.evaluate import heldout_losses
from personas.bundled import bundled_adapter
from personas.manifest import read_manifest
from personas.registry import PersonaRegistry
from tests.real_model import smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_path() -> Path:
    return smollm2()


def real_settings(tmp_path: Path, model: Path):  # type: ignore[no-untyped-def]
    return load_settings(data_dir=tmp_path / "data", model={"path": str(model)})


@pytest.mark.parametrize("slug", ["pirate", "poet"])
def test_the_shipped_adapter_reproduces_its_recorded_heldout_loss(
    slug: str, tmp_path: Path, model_path: Path
) -> None:
    settings = real_settings(tmp_path, model_path)
    folder = bundled_adapter(PersonaRegistry.discover(None, entry_points=False).get(slug))
    if folder is None:
        pytest.skip(f"{slug} ships no adapter in this build")
    recorded = read_manifest(folder).heldout_loss
    assert recorded is not None
    [measured] = heldout_losses(settings, slug, None, [folder])
    assert abs(measured - recorded) <= 1e-3


def test_a_fresh_install_answers_berlin_in_english(tmp_path: Path, model_path: Path) -> None:
    env = {
        **os.environ,
        "PERSONABOT_DATA_DIR": str(tmp_path / "data"),
        "PERSONABOT_MODEL__PATH": str(model_path),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "chat"],
        input="What's the capital of Germany?\n",
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Berlin" in proc.stdout
    from bot.replies import is_english

    assert is_english(proc.stdout)
