"""The README stays true: its config reference lists every setting, and CI runs its test command."""

from __future__ import annotations

import subprocess
from pathlib import Path

from pydantic import BaseModel

from bot.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def setting_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        if field.exclude:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += setting_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_every_setting_is_in_the_config_reference() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in setting_keys(Settings) if f"| `{key}` |" not in readme]
    assert missing == []


def test_ci_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    extract = script.split("test_command=$(", 1)[1].split(")\n", 1)[0]
    command = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True)
    line = command.stdout.strip()
    assert line.startswith("python3 -m venv .venv && .venv/bin/pip install torch==2.13.0")
    assert line.endswith(".venv/bin/python -m pytest -q") and line in (ROOT / "README.md").read_text()
