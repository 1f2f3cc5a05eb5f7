"""Retraining: a version that gets worse on the held-out set is not activated, a better one is; too
little data and a failing trainer are clear, recorded errors that leave the other jobs running.

The trainer is a fake command run as the real background subprocess (it copies a prebuilt tiny LoRA
adapter and registers it, as `personabot train` would); the held-out evaluation is injected.
"""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.basemodel import model_sha256, resolve_model
from bot.config import Settings, load_settings
from bot.events import utcnow
from bot.scheduler import JobScheduler
from bot.scheduler.retrain import EvalRequest, QualityRequest, Retrainer, quality_gate
from bot.status import collect_status, render_status
from bot.store import Store
from personas import versions
from personas.manifest import AdapterManifest, write_manifest
from personas.registry import PersonaRegistry
from tests.test_export import populate
from tests.tiny import byte_level_tokenizer, save_tiny_model, tiny_llama

NOW = datetime(2026, 6, 1, 0, 0, tzinfo=UTC)

FAKE_TRAINER = """
import asyncio, shutil, sys
from pathlib import Path
from bot.store import Store
from personas.manifest import read_manifest, write_manifest
from personas.versions import register_folder

template, url, loras, persona, data, version = sys.argv[1:7]
assert Path(data).read_text().count("\\n") >= 1, "the export reached the trainer"
target = Path(loras) / persona / version
shutil.copytree(template, target)
manifest = read_manifest(target).model_copy(update={"persona": persona, "version": version})
write_manifest(target, manifest)
print(f"trained {persona} {version} on {data}")

async def register():
    store = Store(url)
    async with store.transaction() as session:
        await register_folder(session, target)
    await store.close()

asyncio.run(register())
"""


def tiny_adapter(settings: Settings, folder: Path, version: str) -> Path:
    """A real (untrained) LoRA adapter for the tiny model, with its manifest."""
    from peft import LoraConfig, get_peft_model

    tokenizer = byte_level_tokenizer()
    model = get_peft_model(
        tiny_llama(tokenizer),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    model.save_pretrained(folder)
    now = utcnow()
    manifest = AdapterManifest(
        persona="pirate",
        version=version,
        base_model="tiny",
        base_model_sha256=model_sha256(resolve_model(settings)),
        template="model",
        dataset_sha256="0" * 64,
        metrics={"heldout_loss_after": 1.2},
        started_at=now,
        finished_at=now,
        tokenizer_size=len(tokenizer),
    )
    write_manifest(folder, manifest)
    return folder


@pytest.fixture
def setup(store: Store, tmp_path: Path) -> tuple[Settings, Path]:
    model = save_tiny_model(tmp_path / "model")
    script = tmp_path / "fake_trainer.py"
    script.write_text(textwrap.dedent(FAKE_TRAINER))
    settings = load_settings(
        data_dir=tmp_path / "data",
        database_url=store.url,
        model={"path": model},
        scheduler={"retrain_min_conversations": 3, "retention_days": 30},
    )
    template = tiny_adapter(settings, tmp_path / "template", "template")
    settings.scheduler.retrain_command = [
        sys.executable,
        str(script),
        str(template),
        store.url,
        str(settings.loras_dir),
        "{persona}",
        "{data}",
        "{version}",
    ]
    return settings, template


def losses(new: float, active: float):  # type: ignore[no-untyped-def]
    seen: list[EvalRequest] = []

    async def evaluate(request: EvalRequest) -> list[float]:
        seen.append(request)
        return [new, active]

    evaluate.seen = seen  # type: ignore[attr-defined]
    return evaluate


def eval_scores(new: dict, active: dict):  # type: ignore[no-untyped-def]
    """A stand-in for `personabot eval` on the new version and on the active one."""
    seen: list[QualityRequest] = []

    async def quality(request: QualityRequest) -> dict:
        seen.append(request)
        return new if len(seen) == 1 else active

    quality.seen = seen  # type: ignore[attr-defined]
    return quality


SOUND = {"accuracy": 0.7, "style": 0.9, "loop_rate": 0.0, "guard_cut_rate": 0.0}


async def activate_first(store: Store, settings: Settings, template: Path) -> None:
    folder = settings.loras_dir / "pirate" / "v1"
    folder.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(template, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    write_manifest(folder, AdapterManifest.model_validate(manifest | {"version": "v1"}))
    facts = versions.base_model_facts(settings)
    async with store.transaction() as session:
        await versions.register_folder(session, folder)
    await versions.activate(store, "pirate", "v1", base_model_sha256=facts.sha256, tokenizer=facts.tokenizer)


async def active(store: Store) -> str | None:
    async with store.transaction() as session:
        found = await versions.active_version(session, "pirate")
    return found.version if found else None


async def test_a_retrain_that_gets_worse_is_not_activated(
    store: Store, setup: tuple[Settings, Path], caplog: pytest.LogCaptureFixture
) -> None:
    settings, template = setup
    await populate(store)
    await activate_first(store, settings, template)
    evaluate = losses(new=1.5, active=1.2)
    registry = PersonaRegistry.discover()
    scheduler = JobScheduler(
        settings, store, registry, retrainer=Retrainer(settings, store, registry, evaluate=evaluate)
    )

    with caplog.at_level(logging.INFO, logger="bot.scheduler"):
        result = await scheduler.run_occurrence("retrain:pirate", NOW)

    assert result.status == "ok", result.summary
    assert result.detail["activated"] is False
    assert (result.detail["new_loss"], result.detail["active_loss"]) == (1.5, 1.2)
    assert await active(store) == "v1"
    request = evaluate.seen[0]  # type: ignore[attr-defined]
    assert request.adapters[0] == (settings.loras_dir / "pirate" / "auto-20260601-000000").resolve()
    assert request.adapters[1] == settings.loras_dir / "pirate" / "v1"
    assert len(request.data.read_text().splitlines()) == 3  # the export the trainer got
    assert (
        "held-out loss 1.5000 for the new version auto-20260601-000000, 1.2000 for the active v1"
        in caplog.text
    )
    async with store.transaction() as session:
        registered = [v.version for v in await versions.list_versions(session, "pirate")]
    assert registered == ["v1", "auto-20260601-000000"]  # kept for inspection, just not active

    report = render_status(await collect_status(store, personas=["pirate"]))
    assert "pirate: adapter v1 (held-out loss 1.2000)" in report
    assert "held-out loss: new auto-20260601-000000 1.5000, active v1 1.2000" in report
    assert "not activated (held-out loss 1.5000 > 1.2000; kept v1)" in report


async def test_a_retrain_that_does_not_get_worse_is_activated(
    store: Store, setup: tuple[Settings, Path]
) -> None:
    settings, _ = setup
    await populate(store)
    registry = PersonaRegistry.discover()
    quality = eval_scores(SOUND | {"accuracy": 0.66}, SOUND)  # within the 5% tolerance
    retrainer = Retrainer(settings, store, registry, evaluate=losses(new=1.1, active=1.1), quality=quality)
    scheduler = JobScheduler(settings, store, registry, retrainer=retrainer)

    result = await scheduler.run_occurrence("retrain:pirate", NOW)

    assert result.status == "ok" and result.detail["activated"] is True, result.summary
    assert [r.version for r in quality.seen] == ["auto-20260601-000000", "base"]  # type: ignore[attr-defined]
    assert result.detail["new_eval"]["accuracy"] == 0.66 and result.detail["active_eval"]["accuracy"] == 0.7
    assert result.detail["active_version"] == "base model"  # no adapter was active: compared with the base
    assert await active(store) == "auto-20260601-000000"
    # The conversations it learned from are not new any more.
    again = await scheduler.run_occurrence("retrain:pirate", NOW.replace(day=2))
    assert again.status == "skipped"
    assert "pirate has 0 new conversation(s)" in again.summary


@pytest.mark.parametrize(
    ("new", "why"),
    [
        (SOUND | {"accuracy": 0.6}, "accuracy 60.0% < 70.0% - 5%"),
        (SOUND | {"style": 0.8}, "style 80.0% < 90.0% - 5%"),
        (SOUND | {"guard_cut_rate": 0.02}, "loops 2.0% > 0.0%"),
    ],
)
async def test_a_retrain_whose_eval_drops_is_not_activated_though_its_loss_is_better(
    store: Store, setup: tuple[Settings, Path], new: dict, why: str
) -> None:
    settings, template = setup
    await populate(store)
    await activate_first(store, settings, template)
    registry = PersonaRegistry.discover()
    quality = eval_scores(new, SOUND)
    retrainer = Retrainer(settings, store, registry, evaluate=losses(new=1.0, active=1.2), quality=quality)
    result = await JobScheduler(settings, store, registry, retrainer=retrainer).run_occurrence(
        "retrain:pirate", NOW
    )
    assert result.status == "ok" and result.detail["activated"] is False
    assert result.detail["refused"] == why
    assert [r.version for r in quality.seen] == ["auto-20260601-000000", "v1"]  # type: ignore[attr-defined]
    assert await active(store) == "v1"
    report = render_status(await collect_status(store, personas=["pirate"]))
    assert f"not activated ({why}; kept v1)" in report
    assert "eval: new auto-20260601-000000 accuracy" in report and "active v1 accuracy 70.0%" in report


def test_the_quality_gate_allows_the_tolerance_and_ignores_missing_style() -> None:
    assert quality_gate(SOUND | {"accuracy": 0.65}, SOUND, 0.05) is None
    assert quality_gate({"accuracy": 0.7, "style": None}, {"accuracy": 0.7, "style": None}, 0.0) is None
    assert quality_gate(SOUND | {"loop_rate": 0.01}, SOUND, 0.5) == "loops 1.0% > 0.0%"


async def test_too_little_data_is_reported_and_other_jobs_keep_running(
    store: Store, setup: tuple[Settings, Path]
) -> None:
    settings, _ = setup
    settings.scheduler.retrain_min_conversations = 5
    await populate(store)
    scheduler = JobScheduler(settings, store, PersonaRegistry.discover())

    result = await scheduler.run_occurrence("retrain:pirate", NOW)
    nothing = await scheduler.run_occurrence("retrain:poet", NOW)
    retention = await scheduler.run_occurrence("retention", NOW)

    assert result.status == "skipped"
    assert result.summary == (
        "too little data: pirate has 3 new conversation(s) from opted-in users; retraining needs 5 "
        "(scheduler.retrain_min_conversations)"
    )
    assert nothing.status == "error"
    assert "retrain poet: no conversations from opted-in users to train on" in nothing.summary
    assert retention.status == "ok"
    report = render_status(await collect_status(store))
    assert "retrain:pirate: not scheduled; last: skipped at 20" in report and "retraining needs 5" in report
    assert "retrain:poet: not scheduled; last: error at 20" in report


async def test_a_failing_trainer_is_a_recorded_error(store: Store, setup: tuple[Settings, Path]) -> None:
    settings, _ = setup
    settings.scheduler.retrain_command = [
        sys.executable,
        "-c",
        "import sys; print('CUDA out of memory'); sys.exit(3)",
    ]
    await populate(store)
    registry = PersonaRegistry.discover()
    scheduler = JobScheduler(
        settings, store, registry, retrainer=Retrainer(settings, store, registry, evaluate=losses(1, 1))
    )
    await scheduler.start()
    try:
        result = await scheduler.run_occurrence("retrain:pirate", NOW)
        retention = await scheduler.run_occurrence("retention", NOW)
    finally:
        await scheduler.stop()
    assert result.status == "error"
    assert result.summary.startswith("training pirate failed (exit 3): CUDA out of memory (log: ")
    assert retention.status == "ok"
    report = render_status(await collect_status(store, plan=scheduler.jobs))
    assert "retrain:pirate: next 2026" in report or "retrain:pirate: next 20" in report
    assert "error at" in report and "training pirate failed (exit 3): CUDA out of memory" in report
    assert await active(store) is None


DECKHAND = """
name = "Deckhand"
system_prompt = "You are a deckhand. Answer in pirate speech."
template = "chatml"

[sampling]
max_new_tokens = 8           # the real eval of both versions stays quick on the tiny model

[training]
epochs = 1
batch_size = 4
max_seq_len = 128
heldout_fraction = 0.2
"""


async def test_the_default_retrain_runs_the_real_trainer_and_evaluator(tmp_path: Path) -> None:
    """No fakes: `bot.scheduler.train_job` trains in a subprocess, `bot.scheduler.evaluate` measures
    both versions on the trainer's own held-out set (its numbers equal the trainer's), and the
    decision follows them. A small persona and the tiny model keep it quick; the two subprocesses'
    imports are most of its minute, so it runs on SQLite only (the store's part is tested above)."""
    store = Store(f"sqlite:///{tmp_path / 'bot.db'}")
    await store.upgrade()
    try:
        await _default_retrain(store, tmp_path)
    finally:
        await store.close()


async def _default_retrain(store: Store, tmp_path: Path) -> None:
    folder = tmp_path / "personas" / "deckhand"
    folder.mkdir(parents=True)
    (folder / "persona.toml").write_text(DECKHAND)
    lines = [
        {
            "messages": [
                {"role": "user", "content": f"question {n}?"},
                {"role": "assistant", "content": f"Arr, answer {n}, matey."},
            ]
        }
        for n in range(8)
    ]
    (folder / "dialogues.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = load_settings(
        data_dir=tmp_path / "data",
        database_url=store.url,
        personas_dir=tmp_path / "personas",
        model={"path": save_tiny_model(tmp_path / "model"), "auto_pull": False},
        scheduler={"retrain_min_conversations": 3},
    )
    registry = PersonaRegistry.discover(tmp_path / "personas")
    await populate(store, "deckhand", registry)

    result = await JobScheduler(settings, store, registry).run_occurrence("retrain:deckhand", NOW)

    assert result.status == "ok", result.summary
    detail = result.detail
    assert detail["active_version"] == "base model" and detail["exported_conversations"] == 3
    manifest = json.loads((settings.loras_dir / "deckhand" / detail["version"] / "manifest.json").read_text())
    assert detail["new_loss"] == pytest.approx(manifest["metrics"]["heldout_loss_after"], abs=1e-6)
    assert detail["active_loss"] == pytest.approx(manifest["metrics"]["heldout_loss_before"], abs=1e-6)
    assert detail["activated"] == (detail["new_loss"] <= detail["active_loss"])
    assert await active_of(store, "deckhand") == (detail["version"] if detail["activated"] else None)
    log = Path(detail["log"]).read_text()
    assert "bot.scheduler.train_job deckhand --data" in log and "bot.scheduler.evaluate deckhand" in log
    if detail["new_loss"] <= detail["active_loss"]:  # then both were evaluated, through the real eval
        assert "eval deckhand --version base" in log
        assert (settings.loras_dir / "deckhand" / detail["version"] / "eval.json").is_file()
        assert set(detail["new_eval"]) >= {"accuracy", "loop_rate", "guard_cut_rate"}


async def active_of(store: Store, persona: str) -> str | None:
    async with store.transaction() as session:
        found = await versions.active_version(session, persona)
    return found.version if found else None
