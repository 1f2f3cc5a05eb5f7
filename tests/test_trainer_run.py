"""`personabot train` end to end on a tiny model: outputs, registration, Ctrl-C and --resume, aborts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainerCallback

from bot.basemodel import ModelLocation, model_sha256
from bot.cli import main
from bot.config import load_settings
from bot.prompting import ChatRenderer, TrainingExample
from personas.manifest import read_manifest
from tests.tiny import save_tiny_model
from trainer.data import dataset_sha256
from trainer.run import TrainingInterrupted, TrainRequest, train

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

QUESTIONS = ["What's the capital of Germany?", "What about France?", "hello world", "the quick brown fox"]
ANSWERS = [
    "Arr matey, Berlin.",
    "Aye, ye be sailing to Paris.",
    "Ahoy, the captain says hello.",
    "Arr, a dog.",
]

PERSONA_TOML = """\
name = "Tiny Pirate"
system_prompt = "Talk like a pirate."
style_check = "pirate"

[sampling]
max_new_tokens = 8

[lora]
r = 4
alpha = 8
dropout = 0.0
target_modules = ["q_proj", "v_proj"]

[training]
batch_size = 2
max_seq_len = 128
heldout_fraction = 0.2
learning_rate = 0.005
"""


def _dialogues(count: int = 20) -> str:
    lines = []
    for i in range(count):
        q1, q2 = QUESTIONS[i % 4], QUESTIONS[(i + 1) % 4]
        a1, a2 = ANSWERS[i % 4], ANSWERS[(i + 2) % 4]
        turns = [("user", q1), ("assistant", a1)] + ([("user", q2), ("assistant", a2)] if i % 2 else [])
        lines.append(json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}))
    return "\n".join(lines) + "\n"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny base model and a `tiny` persona in the user's personas folder; returns the data dir."""
    model = save_tiny_model(tmp_path / "model")
    persona = tmp_path / "personas" / "tiny"
    persona.mkdir(parents=True)
    (persona / "persona.toml").write_text(PERSONA_TOML, encoding="utf-8")
    (persona / "dialogues.jsonl").write_text(_dialogues(), encoding="utf-8")
    monkeypatch.setenv("PERSONABOT_MODEL__PATH", str(model))
    monkeypatch.setenv("PERSONABOT_PERSONAS_DIR", str(tmp_path / "personas"))
    return tmp_path / "data"


def _versions(persona: str) -> dict[str, bool]:
    from bot.runtime import open_store
    from personas.versions import list_versions

    async def go() -> dict[str, bool]:
        store = await open_store(load_settings())
        try:
            async with store.transaction() as session:
                return {v.version: v.is_active for v in await list_versions(session, persona)}
        finally:
            await store.close()

    return asyncio.run(go())


def test_train_writes_a_complete_version_and_registers_it(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "tiny", "--max-steps", "4", "--sample-tokens", "6", "--no-progress", "--activate"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert "held-out loss" in out.out and "pirate style" in out.out and "version v1 is active" in out.out
    assert "mask audit passed" in out.err and "padding" in out.err

    folder = env / "loras" / "tiny" / "v1"
    names = {p.name for p in folder.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "manifest.json",
        "loss_curve.png",
        "report.md",
        "training.json",
    } <= names
    assert "checkpoints" not in names and "run.json" not in names

    manifest = read_manifest(folder)
    assert manifest.base_model_sha256 == model_sha256(ModelLocation(tmp_path / "model"))
    assert manifest.dataset_sha256 == dataset_sha256([tmp_path / "personas" / "tiny" / "dialogues.jsonl"])
    assert manifest.template == "model"
    assert manifest.hyperparameters["lora_r"] == 4 and manifest.hyperparameters["max_steps"] == 4
    metrics = manifest.metrics
    assert metrics["steps"] == 4 and metrics["heldout_conversations"] == 4
    assert metrics["heldout_perplexity_before"] > 1 and metrics["heldout_loss_after"] > 0
    assert 0.0 <= metrics["style_score_after"] <= 1.0 and metrics["style_prompts"] == 4
    assert manifest.started_at <= manifest.finished_at
    weights = load_file(folder / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    assert len(weights) == 2 * 2 * 2  # A and B, for q_proj and v_proj, in 2 layers
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4

    with Image.open(folder / "loss_curve.png") as image:
        assert image.format == "PNG" and image.size[0] > 100
    report = (folder / "report.md").read_text()
    assert report.count("**Before training:**") == 4 and report.count("**After training:**") == 4
    assert "heldout_loss_after" in report and "**User:**" in report
    history = json.loads((folder / "training.json").read_text())
    assert [step for step, _ in history["losses"]] == [1, 2, 3, 4]  # one point per optimizer step
    assert history["heldout_loss_after"] == metrics["heldout_loss_after"]
    assert len(history["samples"]) == 4 and {"prompt", "before", "after"} <= set(history["samples"][0])

    assert _versions("tiny") == {"v1": True}
    # A second run is the next version, registered but not active; extra files join the dataset.
    extra = tmp_path / "export.jsonl"
    extra.write_text(_dialogues(4), encoding="utf-8")
    request = TrainRequest(
        "tiny", overrides={"max_steps": 1}, sample_tokens=2, progress=False, extra_dialogues=[extra]
    )
    second = train(load_settings(), request)
    assert second.version == "v2" and not second.activated
    manifest = read_manifest(second.folder)
    assert manifest.dataset_files[-1].endswith("export.jsonl")  # type: ignore[attr-defined]
    assert manifest.dataset_sha256 == dataset_sha256(
        [tmp_path / "personas" / "tiny" / "dialogues.jsonl", extra]
    )
    assert manifest.metrics["train_conversations"] + manifest.metrics["heldout_conversations"] == 24
    assert _versions("tiny") == {"v1": True, "v2": False}
    assert {p.name for p in (env / "loras" / "tiny").iterdir()} == {"v1", "v2"}


class _CtrlC(TrainerCallback):
    """Presses Ctrl-C (a real SIGINT) during step `at`."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step + 1 == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_leaves_a_checkpoint_that_resume_continues_exactly(env: Path) -> None:
    settings = load_settings()
    quiet = {"progress": False, "sample_tokens": 2, "save_steps": 100}
    straight = train(settings, TrainRequest("tiny", overrides={"max_steps": 5}, version="straight", **quiet))

    with pytest.raises(TrainingInterrupted, match=r"stopped at step 2/5.*--resume"):
        train(settings, TrainRequest("tiny", overrides={"max_steps": 5}, callbacks=[_CtrlC(2)], **quiet))
    folder = env / "loras" / "tiny" / "v1"
    assert (folder / "checkpoints" / "checkpoint-2").is_dir() and (folder / "run.json").is_file()
    assert not (folder / "manifest.json").exists()
    assert _versions("tiny") == {"straight": False}

    with pytest.raises(Exception, match="drop --lr"):
        train(settings, TrainRequest("tiny", overrides={"learning_rate": 1.0}, resume=True, **quiet))
    resumed = train(settings, TrainRequest("tiny", resume=True, **quiet))
    assert resumed.version == "v1" and resumed.metrics["steps"] == 5
    assert not (folder / "checkpoints").exists() and not (folder / "run.json").exists()
    assert _versions("tiny") == {"straight": False, "v1": False}

    # Same data order, same updates: the resumed adapter is the uninterrupted one.
    a = load_file(straight.folder / "adapter_model.safetensors")
    b = load_file(folder / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max() < 1e-5, name
    assert resumed.metrics["heldout_loss_before"] == pytest.approx(straight.metrics["heldout_loss_before"])
    assert resumed.metrics["heldout_loss_after"] == pytest.approx(
        straight.metrics["heldout_loss_after"], rel=1e-4
    )


def test_resume_without_an_unfinished_run_says_so(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "tiny", "--resume"]) == 2
    assert "no unfinished run" in capsys.readouterr().err


def test_a_wrong_mask_aborts_before_training_and_shows_the_row(
    env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = ChatRenderer.render_training

    def off_by_one(self: ChatRenderer, *args: Any, **kwargs: Any) -> TrainingExample:
        ex = real(self, *args, **kwargs)
        labels = [-100, *ex.input_ids[:-1]]  # trains the token before each turn, not the last
        return TrainingExample(ex.input_ids, labels, ex.truncated, ex.dropped, ex.spans)

    monkeypatch.setattr(ChatRenderer, "render_training", off_by_one)
    assert main(["train", "tiny", "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "mask audit failed for personas/tiny/dialogues.jsonl:" in err or "mask audit failed for /" in err
    assert "training aborted" in err and "conversation " in err and "label" in err
    assert not (env / "loras" / "tiny").exists() or not any((env / "loras" / "tiny").iterdir())


def test_bad_dialogues_abort_with_file_and_line(
    env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dialogues = tmp_path / "personas" / "tiny" / "dialogues.jsonl"
    dialogues.write_text(_dialogues(3) + '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    assert main(["train", "tiny", "--max-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "dialogues.jsonl:4: no assistant turn to train on" in err
    assert "personabot dataset check --persona tiny" in err


def test_bad_hyperparameters_are_one_line_errors(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "tiny", "--dropout", "1.5"]) == 2
    assert "--dropout 1.5: must be in [0, 1)" in capsys.readouterr().err
    assert main(["train", "tiny", "--device", "tpu"]) == 2
    assert "--device tpu: use auto, cpu or cuda" in capsys.readouterr().err
    assert main(["train", "nobody"]) == 2
    assert "unknown persona 'nobody'" in capsys.readouterr().err


def test_torchrun_with_two_processes_trains_one_version(env: Path, tmp_path: Path) -> None:
    """The same command under `torchrun` (DDP over gloo on the CPU): one version, reported once."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    command = [str(torchrun), "--nproc_per_node", "2", "-m", "bot.cli", "train", "tiny", "--max-steps", "3"]
    command += ["--no-progress", "--sample-tokens", "2"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("held-out loss") == 1 and "registered, not active" in done.stdout
    assert "3 steps of 2 x 1 rows" in done.stderr
    assert read_manifest(env / "loras" / "tiny" / "v1").metrics["steps"] == 3
    assert _versions("tiny") == {"v1": False}
