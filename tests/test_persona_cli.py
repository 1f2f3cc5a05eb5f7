"""`personabot persona list|show|validate|activate|rollback|deactivate` through bot.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bot.basemodel import ModelLocation, model_sha256
from bot.cli import main
from tests.test_persona_spec import GOOD, persona_folder
from tests.test_persona_versions import make_adapter
from tests.tiny import save_tiny_model


@pytest.fixture
def base_sha(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny base model as `model.path`; returns its sha256 as adapters record it."""
    folder = save_tiny_model(tmp_path / "tiny-model")
    monkeypatch.setenv("PERSONABOT_MODEL__PATH", str(folder))
    return model_sha256(ModelLocation(folder))


def loras(tmp_path: Path) -> Path:
    return tmp_path / "data" / "loras"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["persona", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_list_shows_source_active_version_and_heldout_loss(
    tmp_path: Path, base_sha: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_adapter(loras(tmp_path) / "pirate" / "v1", base_sha=base_sha, loss=1.8)
    make_adapter(loras(tmp_path) / "pirate" / "v2", base_sha=base_sha, loss=1.25)
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["SLUG", "NAME", "SOURCE", "ACTIVE", "VERSION", "HELD-OUT", "LOSS"]
    assert "pirate" in out and "base" in out

    # Trained folders that were never registered are registered on activation.
    code, out, _ = run(capsys, "activate", "pirate", "v1")
    assert (code, out.strip()) == (0, "pirate: version v1 is active (held-out loss 1.8000)")
    code, out, _ = run(capsys, "activate", "pirate", "v2")
    assert code == 0

    code, out, _ = run(capsys, "list", "--json")
    rows = {r["slug"]: r for r in json.loads(out)}
    assert rows["pirate"]["active_version"] == "v2" and rows["pirate"]["heldout_loss"] == 1.25
    assert rows["pirate"]["source"] == "builtin"
    assert rows["poet"]["active_version"] is None
    assert rows["assistant"]["default"] is True

    code, out, _ = run(capsys, "list")
    pirate_line = next(line for line in out.splitlines() if line.startswith("pirate"))
    assert pirate_line.split()[-3:] == ["builtin", "v2", "1.2500"]

    code, out, _ = run(capsys, "show", "pirate")
    assert "Captain Saltbeard (pirate)" in out and "plugin hooks: none" in out
    versions = out.split("adapter versions (* active):")[1].splitlines()
    assert versions[1].split()[:2] == ["VERSION", "HELD-OUT"]
    assert versions[2].split()[:2] == ["v1", "1.8000"]  # no "*": not active
    assert versions[3].split()[:3] == ["*", "v2", "1.2500"]

    code, out, _ = run(capsys, "rollback", "pirate")
    assert (code, out.strip()) == (0, "pirate: rolled back to version v1 (held-out loss 1.8000)")
    code, out, _ = run(capsys, "deactivate", "pirate")
    assert (code, out.strip()) == (0, "pirate: version v1 deactivated; it answers with the base model")
    code, out, _ = run(capsys, "list", "--json")
    assert {r["slug"]: r for r in json.loads(out)}["pirate"]["active_version"] is None


def test_activate_refusals_are_one_line(
    tmp_path: Path, base_sha: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make_adapter(loras(tmp_path) / "pirate" / "old", base_sha="e" * 64)
    code, _, err = run(capsys, "activate", "pirate", "old")
    assert code == 2
    assert err.startswith("personabot: error: ") and err.count("\n") == 1
    assert "trained on base model tiny-llama (sha256 eeeeeeeeeeee…), but the configured base model's" in err

    make_adapter(loras(tmp_path) / "pirate" / "big", base_sha=base_sha, kind="resized")
    code, _, err = run(capsys, "activate", "pirate", "big")
    assert code == 2 and "resized vocabulary" in err

    code, _, err = run(capsys, "activate", "pirate", "never-trained")
    assert code == 2 and "persona 'pirate' has no adapter version 'never-trained' (known: big, old)" in err
    code, _, err = run(capsys, "activate", "kraken", "v1")
    assert code == 2 and "unknown persona 'kraken'" in err
    code, _, err = run(capsys, "rollback", "pirate")
    assert code == 2 and "no active adapter version to roll back" in err

    code, out, _ = run(capsys, "list", "--json")
    assert {r["slug"]: r for r in json.loads(out)}["pirate"]["active_version"] is None


def test_activate_warns_when_the_template_changed(
    tmp_path: Path, base_sha: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = make_adapter(loras(tmp_path) / "pirate" / "v1", base_sha=base_sha)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["template"] = "chatml"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run(capsys, "activate", "pirate", "v1")
    assert code == 0 and "warning: trained with template 'chatml'" in err


def test_validate_reports_every_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "validate")
    assert code == 0, err
    assert "ok  pirate (builtin): 255 dialogues" in out and "ok  poet (builtin): 276 dialogues" in out

    mine = tmp_path / "mine"
    monkeypatch.setenv("PERSONABOT_PERSONAS_DIR", str(mine))
    good = persona_folder(mine, "good")
    (good / "plugin.py").write_text("def before_prompt(ctx):\n    return 'x'\n")
    persona_folder(mine, "badcron", GOOD.replace("0 9 * * mon-fri", "0 9 * *"))
    lines = persona_folder(mine, "badlines")
    (lines / "d.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        "{oops\n"
        '{"messages": [{"role": "wizard", "content": "hi"}]}\n'
        '{"messages": [{"role": "user", "content": "only a question"}]}\n'
    )
    broken = persona_folder(mine, "badplugin")
    (broken / "plugin.py").write_text("def before_prompt(ctx:\n")

    code, out, err = run(capsys, "validate")
    assert code == 1
    assert f"ok  good (user:{mine}): 1 dialogues, hooks: before_prompt" in out
    assert "FAILED  badlines" in out and "FAILED  badplugin" in out
    assert "badcron/persona.toml: schedule.0.cron: invalid cron expression '0 9 * *'" in err
    assert f"{lines / 'd.jsonl'}:2: invalid JSON" in err
    assert f"{lines / 'd.jsonl'}:3: messages.0: needs a role" in err
    assert f"{lines / 'd.jsonl'}:4: no assistant turn to train on" in err
    assert f"{broken / 'plugin.py'}: cannot load: SyntaxError" in err
    assert "5 problem(s)" in err

    code, out, err = run(capsys, "validate", "good")
    assert code == 0 and out.startswith("ok  good")
    code, out, err = run(capsys, "validate", "badcron")
    assert code == 1 and "badcron/persona.toml" in err


def test_a_broken_user_persona_stops_other_commands_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "mine"
    monkeypatch.setenv("PERSONABOT_PERSONAS_DIR", str(mine))
    folder = persona_folder(mine, "pirate2", GOOD.replace("top_p = 0.9", "top_p = 1.5"))
    code, out, err = run(capsys, "list")
    assert code == 2 and out == ""
    assert err == f"personabot: error: {folder / 'persona.toml'}: sampling.top_p: must be in (0, 1]\n"
