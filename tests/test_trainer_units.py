"""Small pieces of the trainer: style checks, the held-out split, hyperparameters, versions, progress."""

from __future__ import annotations

import io
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from personas.spec import PersonaSpec
from personas.style import is_haiku, is_pirate, style_check, style_score
from trainer.hyper import HyperparameterError, from_spec, with_overrides
from trainer.progress import ProgressBar, StopOnInterrupt, interrupt_requests
from trainer.run import ResumeError, find_resume, latest_checkpoint, next_version
from trainer.split import heldout_count, split_heldout


@pytest.mark.parametrize(
    ("reply", "pirate"),
    [
        ("Arr, the capital be Berlin.", True),
        ("Aye aye, captain!", True),
        ("Ye can boil it for six minutes, MATEY.", True),
        ("Shiver   me timbers, that's a big one.", True),
        ("The capital of Germany is Berlin.", False),
        ("Yesterday I arrived at the arrangement.", False),  # 'arr' only inside words
        ("", False),
    ],
)
def test_pirate_words(reply: str, pirate: bool) -> None:
    assert is_pirate(reply) is pirate


@pytest.mark.parametrize(
    ("reply", "haiku"),
    [
        ("Soft rain on the roof\nthe kettle begins to sing\nmorning finds its voice", True),
        ("\nline one\n\nline two\nline three\n  \n", True),  # blank lines do not count
        ("one line only", False),
        ("one\ntwo", False),
        ("one\ntwo\nthree\nfour", False),
    ],
)
def test_haiku_lines(reply: str, haiku: bool) -> None:
    assert is_haiku(reply) is haiku


def test_style_score_and_unknown_check() -> None:
    assert style_score("pirate", ["arr", "hello", "ahoy", "hi"]) == 0.5
    assert style_score("haiku", []) == 0.0
    assert style_check(None) is None
    with pytest.raises(ValueError, match="unknown style check 'limerick'"):
        style_check("limerick")


def test_heldout_split_is_deterministic_and_seeded() -> None:
    items = list(range(255))
    train, held = split_heldout(items, 0.1, seed=0)
    assert len(held) == 26 == heldout_count(255, 0.1) and len(train) == 229
    assert sorted(train + held) == items and held == sorted(held)
    assert split_heldout(items, 0.1, seed=0) == (train, held)
    assert split_heldout(items, 0.1, seed=1)[1] != held
    assert heldout_count(1, 0.5) == 0 and heldout_count(3, 0.01) == 1 and heldout_count(2, 0.99) == 1


def test_hyperparameters_from_persona_then_flags() -> None:
    spec = PersonaSpec.model_validate({"slug": "x", "name": "X", "lora": {"r": 8}, "training": {"epochs": 2}})
    base = from_spec(spec)
    assert (base.lora_r, base.lora_alpha, base.lora_dropout, base.epochs) == (8, 32, 0.05, 2)
    assert "down_proj" in base.target_modules and "q_proj" in base.target_modules
    chosen = with_overrides(base, {"learning_rate": 1e-3, "lora_r": None, "max_steps": 7})
    assert (chosen.learning_rate, chosen.lora_r, chosen.max_steps) == (1e-3, 8, 7)
    assert type(chosen).from_dict(chosen.as_dict()) == chosen
    with pytest.raises(HyperparameterError, match=r"^--lr 0: must be positive$"):
        with_overrides(base, {"learning_rate": 0})
    with pytest.raises(HyperparameterError, match="--grad-accum 0"):
        with_overrides(base, {"gradient_accumulation_steps": 0})


def test_versions_count_up_past_folders_and_registered_names(tmp_path: Path) -> None:
    assert next_version(tmp_path / "missing") == "v1"
    (tmp_path / "v2").mkdir()
    (tmp_path / "custom").mkdir()
    assert next_version(tmp_path) == "v3"
    assert next_version(tmp_path, ["v7", "other"]) == "v8"


def test_resume_finds_the_newest_unfinished_run(tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="no unfinished run"):
        find_resume(tmp_path, True)
    done = tmp_path / "v1"
    done.mkdir()
    (done / "run.json").write_text("{}")
    (done / "manifest.json").write_text("{}")
    open_run = tmp_path / "v2"
    (open_run / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (open_run / "checkpoints" / "checkpoint-12").mkdir(parents=True)
    (open_run / "checkpoints" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (open_run / "run.json").write_text("{}")
    assert find_resume(tmp_path, True) == open_run
    assert find_resume(tmp_path, "v2") == open_run
    with pytest.raises(ResumeError, match="already finished"):
        find_resume(tmp_path, "v1")
    # checkpoint-12 was cut off while being written (no trainer_state.json): the last complete one wins.
    assert latest_checkpoint(open_run) == open_run / "checkpoints" / "checkpoint-3"


def test_progress_bar_shows_trained_tokens_per_second_and_eta() -> None:
    out = io.StringIO()
    tokens = [0]
    bar = ProgressBar(lambda: tokens[0], file=out)
    state = SimpleNamespace(is_world_process_zero=True, max_steps=10, global_step=0)
    bar.on_train_begin(None, state, None)
    for step in range(1, 4):
        tokens[0] += 500
        state.global_step = step
        bar.on_log(None, state, None, logs={"loss": 2.5 - step / 10})
        bar.on_step_end(None, state, None)
    bar.on_train_end(None, state, None)
    text = out.getvalue()
    assert "3/10" in text and "tok/s=" in text and "loss=2.200" in text
    assert "<" in text  # tqdm's elapsed<remaining: the ETA
    assert bar.losses == [(1, 2.4), (2, 2.3), (3, 2.2)]
    assert bar.tokens_per_second() > 0


def test_first_ctrl_c_asks_for_a_checkpoint_second_one_quits() -> None:
    stopper = StopOnInterrupt()
    control = SimpleNamespace(should_save=False, should_training_stop=False)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the tests run in a background job
    with interrupt_requests(stopper):
        signal.raise_signal(signal.SIGINT)
        assert stopper.requested
        stopper.on_step_end(None, SimpleNamespace(global_step=4), control)
        assert control.should_save and control.should_training_stop and stopper.stopped_at == 4
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_cpu_threads_follow_the_cores_other_work_leaves_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bot.cpu_threads import fixed_threads
    from trainer.threads import CpuThreads

    before = torch.get_num_threads()
    try:
        threads = CpuThreads(cores=2, min_interval=1.0)
        samples = iter(
            [
                (10.0, 15.0, 5.0),  # 10 s: 15 core-seconds busy, 5 of them ours -> others kept 1 core busy
                (20.0, 27.0, 7.0),  # 10 s: 12 busy, 2 ours -> others 1.0
                (30.0, 40.0, 18.0),  # 10 s: 13 busy, 11 ours -> others 0.2: both cores are ours
                (30.5, 41.0, 19.0),  # too soon to tell: unchanged
            ]
        )
        threads._mark = (0.0, 0.0, 0.0)
        monkeypatch.setattr(threads, "_sample", lambda: next(samples))
        assert [threads.adjust() for _ in range(4)] == [1, 1, 2, 2]
        assert threads.history == [1, 1, 2]
        assert CpuThreads(fixed=1).adjust() == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert fixed_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert fixed_threads(None) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert fixed_threads(None) is None
