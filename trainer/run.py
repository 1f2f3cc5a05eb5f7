"""`personabot train PERSONA`: one LoRA adapter version, trained, evaluated, written and registered.

The run, in order, one function per stage (`train` calls them, passing a `_Run`):

1. `_plan`: the settings and the version name, from the persona and the command line or from the run
   being resumed;
2. `_load_data`: read the persona's dialogues, split off the held-out conversations (seeded), render
   them with `bot.prompting`, audit every row's mask, pack the rows;
3. `_measure_baseline`: the base model on the held-out split: assistant-only loss, perplexity, sample
   replies (`_Probe` takes the same measurements before and after);
4. `_fit`: train a peft LoRA through the transformers `Trainer` (so `accelerate launch` / `torchrun`,
   bf16 on GPU, gradient accumulation and checkpoints all work), with the token-weighted assistant loss;
5. `_finalize`: measure again, then write `<data_dir>/loras/<persona>/<version>/`: the adapter,
   `manifest.json`, `loss_curve.png`, `report.md`; and record the version in the store (active only
   with `activate`).

Checkpoints go to `<version>/checkpoints/` while the run lasts; Ctrl-C saves one and stops, and
`resume` continues the newest unfinished run (or a named one) with its own settings.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.errors import PersonabotError
from trainer.hyper import Hyperparameters, flag, from_spec, with_overrides

log = logging.getLogger(__name__)

RUN_STATE = "run.json"  # an unfinished run's settings; removed when the run completes
CHECKPOINTS = "checkpoints"


class TrainingInterrupted(PersonabotError):
    """Ctrl-C: a checkpoint was saved and `--resume` continues from it."""

    exit_code = 130


class ResumeError(PersonabotError):
    """There is no run to resume, or it cannot be resumed as asked."""


@dataclass
class TrainRequest:
    """What `personabot train` was asked to do."""

    persona: str
    overrides: dict[str, Any] = field(default_factory=dict)  # Hyperparameters fields set on the CLI
    resume: bool | str = False  # True: the newest unfinished run; a string: that version
    activate: bool = False
    device: str | None = None  # None: `model.device` from the config
    version: str | None = None  # the new version's name (default: v1, v2, ...)
    save_steps: int = 50
    sample_tokens: int = 64  # reply length cap for before/after samples (and the style score)
    style_prompts: int | None = None  # held-out prompts scored for style (None: all)
    shown_samples: int = 5
    progress: bool = True
    callbacks: list[Any] = field(default_factory=list)  # extra `TrainerCallback`s
    extra_dialogues: list[Path] = field(default_factory=list)  # files read after the persona's own
    threads: int | None = None  # CPU threads; None: OMP_NUM_THREADS, else adapt to the idle cores


@dataclass
class TrainResult:
    persona: str
    version: str
    folder: Path
    metrics: dict[str, Any]
    hyperparameters: dict[str, Any]
    activated: bool


def _now() -> datetime:
    return datetime.now(UTC)


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- versions and resuming --------------------------------------------------------------------------


def _version_numbers(names: Sequence[str]) -> list[int]:
    return [int(m.group(1)) for n in names if (m := re.fullmatch(r"v(\d+)", n))]


def next_version(persona_dir: Path, registered: Sequence[str] = ()) -> str:
    """`v<N+1>` for the highest `vN` among the persona's folders and registered versions."""
    names = [p.name for p in persona_dir.iterdir()] if persona_dir.is_dir() else []
    return f"v{max(_version_numbers([*names, *registered]), default=0) + 1}"


def _unfinished(persona_dir: Path) -> list[Path]:
    """Version folders with a run state and no manifest, newest first."""
    if not persona_dir.is_dir():
        return []
    found = [
        p for p in persona_dir.iterdir() if (p / RUN_STATE).is_file() and not (p / "manifest.json").is_file()
    ]
    return sorted(found, key=lambda p: (p / RUN_STATE).stat().st_mtime, reverse=True)


def latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = folder / CHECKPOINTS
    if not checkpoints.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in checkpoints.iterdir()
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    ]
    complete = [(n, p) for n, p in found if (p / "trainer_state.json").is_file()]
    return max(complete)[1] if complete else None


def find_resume(persona_dir: Path, which: bool | str) -> Path:
    """The folder of the run to resume: the named version, or the newest unfinished one."""
    if isinstance(which, str):
        folder = persona_dir / which
        if (folder / "manifest.json").is_file():
            raise ResumeError(f"{folder}: version {which!r} already finished; nothing to resume")
        if not (folder / RUN_STATE).is_file():
            raise ResumeError(f"{folder}: no unfinished run of version {which!r} to resume")
        return folder
    runs = _unfinished(persona_dir)
    if not runs:
        raise ResumeError(f"no unfinished run under {persona_dir} to resume; start one without --resume")
    return runs[0]


def _read_state(folder: Path) -> dict[str, Any]:
    path = folder / RUN_STATE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path}: unreadable run state ({exc})") from None
    if not isinstance(data, dict) or "hyperparameters" not in data:
        raise ResumeError(f"{path}: not a personabot run state")
    return data


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    tmp = folder / (RUN_STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, default=str), encoding="utf-8")
    tmp.replace(folder / RUN_STATE)


async def _registered_versions(settings: Settings, persona: str) -> list[str]:
    from bot.runtime import open_store
    from personas.versions import list_versions

    store = await open_store(settings)
    try:
        async with store.transaction() as session:
            return [v.version for v in await list_versions(session, persona)]
    finally:
        await store.close()


async def _register(
    settings: Settings,
    persona: str,
    version: str,
    folder: Path,
    base_sha256: str,
    metrics: dict[str, Any],
    activate_with: Any | None,
) -> bool:
    from bot.runtime import open_store
    from personas.versions import activate, register_version

    store = await open_store(settings)
    try:
        async with store.transaction() as session:
            await register_version(session, persona, version, folder.resolve(), base_sha256, metrics)
        if activate_with is None:
            return False
        tokenizer, vocab_size = activate_with
        await activate(
            store,
            persona,
            version,
            base_model_sha256=base_sha256,
            tokenizer=tokenizer,
            base_vocab_size=vocab_size,
        )
        return True
    finally:
        await store.close()


# -- the model ---------------------------------------------------------------------------------------


def model_location(settings: Settings) -> Any:
    """The configured base model, pulled first when it is the default and `model.auto_pull` allows."""
    from bot.basemodel import MARKER, default_model_dir, pull_default_model, resolve_model

    if (
        settings.model.path is None
        and settings.model.auto_pull
        and not (default_model_dir(settings) / MARKER).is_file()
    ):
        _echo("personabot: the default model is not pulled yet; pulling it once now")
        pull_default_model(settings)
    return resolve_model(settings)


def lora_model(model: Any, hp: Hyperparameters, persona_toml: str) -> Any:
    """`model` wrapped with a fresh peft LoRA adapter (errors name `persona_toml`'s lora table)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise PersonabotError(f"{persona_toml}: lora.target_modules: {exc}") from None


def training_arguments(hp: Hyperparameters, folder: Path, device: str, save_steps: int) -> Any:
    """The `Trainer` settings of a run: checkpoints under `folder`, bf16 on GPU, float32 on the CPU."""
    import torch
    from transformers import TrainingArguments

    if device not in ("auto", "cpu", "cuda", "cuda:0"):
        raise PersonabotError(
            f"--device {device}: use auto, cpu or cuda (pick GPUs with CUDA_VISIBLE_DEVICES, "
            "several with torchrun / accelerate launch)"
        )
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PersonabotError(f"--device {device}: CUDA is not available on this machine")
    return TrainingArguments(
        output_dir=str(folder / CHECKPOINTS),
        per_device_train_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        num_train_epochs=hp.epochs,
        max_steps=hp.max_steps or -1,
        learning_rate=hp.learning_rate,
        warmup_steps=hp.warmup_ratio,  # a float below 1 is a share of the steps
        weight_decay=hp.weight_decay,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=2,
        report_to="none",
        disable_tqdm=True,
        seed=hp.seed,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=0,
        dataloader_pin_memory=cuda,
        ddp_find_unused_parameters=False,
        average_tokens_across_devices=True,
    )


def _agree(value: str) -> str:
    """The main process's value on every process (one value per run, e.g. the version name)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])
    return value


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class _Plan:
    hp: Hyperparameters
    version: str  # "" on the other processes of a new multi-process run, until `_agree`
    state: dict[str, Any]  # the run state of the run being resumed ({} for a new run)
    started_at: datetime | None  # when the resumed run started


def _plan(settings: Settings, request: TrainRequest, spec: Any, persona_dir: Path, data_sha: str) -> _Plan:
    """Settings and version: from the persona and the command line, or from the run being resumed.

    Under torchrun / accelerate launch only the first process picks a new version's name.
    """
    from personas.manifest import check_version_name

    if request.resume:
        if any(v is not None for v in request.overrides.values()) or request.version:
            given = ", ".join(flag(k) for k, v in request.overrides.items() if v is not None) or "--version"
            raise ResumeError(f"--resume continues with the run's own settings; drop {given}")
        folder = find_resume(persona_dir, request.resume)
        state = _read_state(folder)
        if state.get("dataset_sha256") != data_sha:
            raise ResumeError(
                f"{folder.name}: the dialogues changed since this run started; start a new run without --resume"
            )
        hp = Hyperparameters.from_dict(state["hyperparameters"])
        return _Plan(hp, folder.name, state, datetime.fromisoformat(state["started_at"]))
    hp = with_overrides(from_spec(spec), request.overrides)
    version = ""
    if int(os.environ.get("RANK", "0")) == 0:  # the others learn the name from it: they would race
        version = request.version or next_version(
            persona_dir, asyncio.run(_registered_versions(settings, spec.slug))
        )
        check_version_name(version)
        if (persona_dir / version).exists() and any((persona_dir / version).iterdir()):
            raise PersonabotError(
                f"{persona_dir / version} already exists; pick another --version or remove it"
            )
    return _Plan(hp, version, {}, None)


@dataclass
class _Run:
    """One training run as its stages see it: what was asked, the persona, its data and where it goes."""

    settings: Settings
    request: TrainRequest
    echo: Callable[[str], None]
    wall_start: float  # `time.perf_counter()` when the run began, for `wall_seconds`
    persona: Any  # personas.registry.Persona
    paths: list[Path]  # the dialogue files, the persona's own first
    data_sha: str
    hp: Hyperparameters
    version: str
    state: dict[str, Any]  # the run state (`run.json`): {} until the baseline is measured
    started_at: datetime
    location: Any  # bot.basemodel.ModelLocation
    tokenizer: Any
    renderer: Any  # bot.prompting.ChatRenderer
    system: str | None  # the persona's system prompt, as trained and as sampled
    data: Any  # trainer.prepare.PreparedData
    args: Any  # transformers.TrainingArguments
    folder: Path

    @property
    def spec(self) -> Any:
        return self.persona.spec

    @property
    def slug(self) -> str:
        return str(self.persona.spec.slug)

    @property
    def main(self) -> bool:
        """The process that evaluates, writes and registers (the only one outside torchrun)."""
        return bool(self.args.process_index == 0)

    @property
    def device(self) -> Any:
        return self.args.device

    def collator(self) -> Any:
        """A fresh `PackedCollator` (each counts the padding of what it collates)."""
        from trainer.packing import PackedCollator

        tokenizer = self.tokenizer
        pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.renderer.end_of_turn_ids[0]
        )
        return PackedCollator(pad_id, 8 if self.device.type == "cuda" else 1)


@dataclass
class _Baseline:
    """The base model measured on the held-out split, before training (kept in the run state)."""

    loss: float
    samples: list[Any]  # trainer.samples.Sample


@dataclass
class _Fitted:
    """The trained model and what the fit stage measured."""

    trainer: Any  # trainer.loss.AssistantLossTrainer
    collator: Any  # trainer.packing.PackedCollator
    progress: Any  # trainer.progress.ProgressBar
    seconds: float


class _Probe:
    """The held-out measurements taken before and after training: loss, and sample replies to score."""

    def __init__(self, run: _Run, model: Any) -> None:
        from personas.style import style_check
        from trainer.samples import heldout_prompts

        self.run = run
        self.model = model
        request, spec = run.request, run.spec
        self.collate = run.collator()
        self.check = style_check(spec.style_check)
        prompts = heldout_prompts(run.data.heldout_conversations)
        if request.style_prompts is not None:
            prompts = prompts[: max(request.style_prompts, request.shown_samples)]
        if not self.check:
            prompts = prompts[: request.shown_samples]
        self.prompts = prompts
        self.max_new = min(spec.sampling.max_new_tokens, request.sample_tokens)
        window = min(spec.context_window or 2048, model.config.max_position_embeddings)
        self.prompt_budget = max(16, window - self.max_new)

    def loss(self) -> tuple[float, int]:
        """Assistant-only loss on the held-out rows, and how many tokens it covers."""
        from trainer.loss import evaluate_loss

        rows, size = self.run.data.heldout_packed, self.run.hp.batch_size
        batches = [self.collate(rows[i : i + size]) for i in range(0, len(rows), size)]
        return evaluate_loss(self.model, batches, self.run.device)

    def samples(self) -> list[Any]:
        from trainer.samples import Sample, generate_replies

        run = self.run
        replies = generate_replies(
            self.model,
            run.renderer,
            [turns for _, turns, _ in self.prompts],
            system=run.system,
            sampling=run.spec.sampling,
            max_new_tokens=self.max_new,
            max_prompt_tokens=self.prompt_budget,
            seed=run.hp.seed,
            device=run.device,
            lore=run.persona.lorebook,
        )
        return [
            Sample(c.where, turns[-1].content, ref, reply)
            for (c, turns, ref), reply in zip(self.prompts, replies, strict=True)
        ]


def train(settings: Settings, request: TrainRequest, echo: Callable[[str], None] = _echo) -> TrainResult:
    """Train one adapter version of `request.persona`; see the module docstring."""
    from bot.cpu_threads import fixed_threads
    from trainer.threads import CpuThreads

    run = _load_data(settings, request, echo)
    model = _load_model(run)
    probe = _Probe(run, model)
    threads = CpuThreads(fixed_threads(request.threads)) if run.device.type == "cpu" else None
    if threads is not None:
        threads.settle()
    baseline = _measure_baseline(run, probe)
    fitted = _fit(run, model, threads)
    if not run.main:
        _barrier()  # the main process evaluates and writes; the others stay in the process group till then
        return TrainResult(run.slug, run.version, run.folder, {}, run.hp.as_dict(), False)
    try:
        return _finalize(run, probe, baseline, fitted, threads)
    finally:
        _barrier()


def _load_data(settings: Settings, request: TrainRequest, echo: Callable[[str], None]) -> _Run:
    """The plan (settings, version), then the dialogues: read, checked, rendered, split and packed."""
    from transformers.utils import logging as hf_logging

    from bot.generation.local import load_tokenizer
    from bot.prompting import ChatRenderer
    from bot.runtime import load_registry
    from personas.spec import display_path
    from trainer.data import dataset_sha256, read_conversations
    from trainer.packing import padding_fraction
    from trainer.prepare import DatasetError, prepare, raise_problems

    hf_logging.disable_progress_bar()  # weight loading/saving bars; the training bar is ours
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    wall_start = time.perf_counter()
    started_at = _now()
    persona = load_registry(settings).get(request.persona)
    spec = persona.spec
    slug = spec.slug
    persona_dir = settings.loras_dir / slug
    persona_toml = display_path(persona.folder / "persona.toml")
    paths = [*persona.dialogue_paths(), *request.extra_dialogues]
    if not paths:
        raise DatasetError(f"{persona_toml}: persona {slug!r} has no dialogue files (dialogues = [])")
    data_sha = dataset_sha256(paths)

    plan = _plan(settings, request, spec, persona_dir, data_sha)
    hp = plan.hp

    location = model_location(settings)
    tokenizer = load_tokenizer(location)
    renderer = ChatRenderer(tokenizer, spec.template)
    system = persona.system_prompt()
    conversations, problems = read_conversations(paths)
    raise_problems(problems, f"; run: personabot dataset check --persona {slug}")
    data = prepare(
        conversations,
        renderer,
        system=system,
        max_seq_len=hp.max_seq_len,
        heldout_fraction=hp.heldout_fraction,
        seed=hp.seed,
        lore=persona.lorebook,
        packing=hp.packing,
    )
    args = training_arguments(hp, persona_dir, request.device or settings.model.device, request.save_steps)
    version = _agree(plan.version)
    folder = persona_dir / version
    args.output_dir = str(folder / CHECKPOINTS)
    run = _Run(
        settings=settings,
        request=request,
        echo=echo,
        wall_start=wall_start,
        persona=persona,
        paths=paths,
        data_sha=data_sha,
        hp=hp,
        version=version,
        state=plan.state,
        started_at=plan.started_at or started_at,
        location=location,
        tokenizer=tokenizer,
        renderer=renderer,
        system=system,
        data=data,
        args=args,
        folder=folder,
    )

    stats = data.train_stats
    steps_per_epoch = math.ceil(
        len(data.train_packed) / (hp.batch_size * args.world_size * hp.gradient_accumulation_steps)
    )
    planned = hp.max_steps or math.ceil(steps_per_epoch * hp.epochs)
    pad_share = padding_fraction(data.train_packed, hp.batch_size)
    if run.main:
        echo(
            f"{slug} {version}: {stats.conversations} training / {data.heldout_stats.conversations} held-out "
            f"conversations; {stats.tokens} tokens ({stats.trained_tokens} trained) in "
            f"{len(data.train_packed)} rows of <= {hp.max_seq_len}; {stats.truncated} cut, {stats.dropped} dropped "
            f"by the window; padding {pad_share:.1%}; mask audit passed"
        )
        echo(
            f"{slug} {version}: {planned} steps of {hp.batch_size} x {hp.gradient_accumulation_steps} rows on {run.device}"
        )
    return run


def _load_model(run: _Run) -> Any:
    """The base model in float32 master weights with a fresh LoRA adapter, on the run's device.

    The Trainer adds bf16 autocast on GPU.
    """
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from personas.spec import display_path

    model = AutoModelForCausalLM.from_pretrained(
        run.location.folder, gguf_file=run.location.gguf_file, dtype=torch.float32, local_files_only=True
    )
    model.config.use_cache = False  # a cache would switch off packed-sequence attention masks
    set_seed(run.hp.seed)  # the LoRA A matrices start random: the same seed, the same adapter
    model = lora_model(model, run.hp, display_path(run.persona.folder / "persona.toml"))
    model.to(run.device)
    return model


def _measure_baseline(run: _Run, probe: _Probe) -> _Baseline:
    """The base model's held-out loss and samples: measured once, then read from the run state on resume."""
    from trainer.samples import Sample

    if "before" not in run.state:
        run.folder.mkdir(parents=True, exist_ok=True)
        with probe.model.disable_adapter():  # exactly the base model, whatever the adapter's initial weights
            before_loss, heldout_tokens = probe.loss()
            before_samples = probe.samples() if run.main else []
        run.state = {
            "persona": run.slug,
            "version": run.version,
            "hyperparameters": run.hp.as_dict(),
            "dataset_sha256": run.data_sha,
            "started_at": run.started_at.isoformat(),
            "before": {
                "loss": before_loss,
                "tokens": heldout_tokens,
                "samples": [s.__dict__ for s in before_samples],
            },
        }
        if run.main:
            _write_state(run.folder, run.state)
            run.echo(
                f"{run.slug} {run.version}: base model held-out loss {before_loss:.4f} "
                f"(ppl {math.exp(before_loss):.2f})"
            )
    before = run.state["before"]
    return _Baseline(float(before["loss"]), [Sample(**s) for s in before["samples"]])


def _fit(run: _Run, model: Any, threads: Any) -> _Fitted:
    """Train the adapter (resuming from the newest checkpoint when asked); Ctrl-C saves and stops."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from trainer.loss import AssistantLossTrainer
    from trainer.packing import PackedDataset
    from trainer.progress import ProgressBar, StopOnInterrupt, interrupt_requests

    request, folder = run.request, run.folder
    collator = run.collator()
    trainer = AssistantLossTrainer(
        model=model, args=run.args, train_dataset=PackedDataset(run.data.train_packed), data_collator=collator
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    progress = ProgressBar(lambda: trainer.trained_tokens, file=sys.stderr if request.progress else _Null())
    stopper = StopOnInterrupt()
    trainer.add_callback(progress)
    if threads is not None:
        trainer.add_callback(threads)
    for callback in request.callbacks:
        trainer.add_callback(callback)
    trainer.add_callback(stopper)
    checkpoint = latest_checkpoint(folder) if request.resume else None
    if checkpoint is not None and run.main:
        run.echo(f"{run.slug} {run.version}: resuming from {checkpoint.name}")
    train_start = time.perf_counter()
    with interrupt_requests(stopper):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    seconds = time.perf_counter() - train_start
    if stopper.requested and trainer.state.global_step < trainer.state.max_steps:
        saved = latest_checkpoint(folder)
        raise TrainingInterrupted(
            f"stopped at step {trainer.state.global_step}/{trainer.state.max_steps}; checkpoint "
            f"{saved or folder / CHECKPOINTS}; continue with: personabot train {run.slug} --resume"
        )
    return _Fitted(trainer, collator, progress, seconds)


def _finalize(run: _Run, probe: _Probe, baseline: _Baseline, fitted: _Fitted, threads: Any) -> TrainResult:
    """Measure the trained adapter, write the version folder, register (and maybe activate) it."""
    if threads is not None:
        threads.settle()
    model = probe.model
    after_loss, heldout_tokens = probe.loss()
    model.merge_adapter()  # one matmul per projection while generating; the saved A and B stay as trained
    try:
        after_samples = probe.samples()
    finally:
        model.unmerge_adapter()
    state = fitted.trainer.state
    losses = [(int(e["step"]), float(e["loss"])) for e in state.log_history if "loss" in e and "step" in e]
    metrics = _metrics(run, baseline.loss, after_loss, heldout_tokens, losses, fitted)
    if threads is not None and threads.history:
        metrics["cpu_threads"] = max(set(threads.history), key=threads.history.count)
    if probe.check is not None:
        from personas.style import style_score

        style = run.spec.style_check
        metrics["style_check"] = style
        metrics["style_prompts"] = len(after_samples)
        metrics["style_score_before"] = style_score(style, [s.reply for s in baseline.samples])
        metrics["style_score_after"] = style_score(style, [s.reply for s in after_samples])

    # The adapter, then what describes it; the manifest is written last (it marks the run finished).
    folder = run.folder
    fitted.trainer.accelerator.unwrap_model(fitted.trainer.model).save_pretrained(str(folder))
    (folder / "README.md").unlink(missing_ok=True)  # peft's blank model card; report.md is ours
    metrics["wall_seconds"] = time.perf_counter() - run.wall_start
    base_sha = _describe_version(run, metrics, losses, baseline.samples, after_samples)
    shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)
    (folder / RUN_STATE).unlink(missing_ok=True)
    # The folder is complete now: if the store is unreachable, `personabot persona activate` registers it.
    activate_with = (run.tokenizer, model.config.vocab_size) if run.request.activate else None
    activated = asyncio.run(
        _register(run.settings, run.slug, run.version, folder, base_sha, metrics, activate_with)
    )
    return TrainResult(run.slug, run.version, folder, metrics, run.hp.as_dict(), activated)


def _metrics(
    run: _Run,
    before_loss: float,
    after_loss: float,
    heldout_tokens: int,
    losses: list[tuple[int, float]],
    fitted: _Fitted,
) -> dict[str, Any]:
    """What the manifest and report say about the run (style scores and wall time are added after)."""
    stats, heldout = run.data.train_stats, run.data.heldout_stats
    return {
        "heldout_loss_before": before_loss,
        "heldout_loss_after": after_loss,
        "heldout_perplexity_before": math.exp(before_loss),
        "heldout_perplexity_after": math.exp(after_loss),
        "heldout_loss_drop": (before_loss - after_loss) / before_loss if before_loss else 0.0,
        "heldout_trained_tokens": heldout_tokens,
        "train_loss_final": losses[-1][1] if losses else None,
        "steps": fitted.trainer.state.global_step,
        "epochs": fitted.trainer.state.epoch,
        "train_conversations": stats.conversations,
        "heldout_conversations": heldout.conversations,
        "train_tokens": stats.tokens,
        "train_trained_tokens": stats.trained_tokens,
        "truncated": stats.truncated + heldout.truncated,
        "dropped": stats.dropped + heldout.dropped,
        "rows": len(run.data.train_packed),
        "padding_fraction": fitted.collator.padding_fraction,
        "trained_tokens_per_second": fitted.progress.tokens_per_second(),
        "train_seconds": fitted.seconds,
    }


def _describe_version(
    run: _Run,
    metrics: dict[str, Any],
    losses: Sequence[tuple[int, float]],
    before: Sequence[Any],
    after: Sequence[Any],
) -> str:
    """`loss_curve.png`, `report.md`, `training.json` and, last, `manifest.json` next to the saved adapter;
    the base sha256."""
    from bot.basemodel import model_sha256
    from personas.manifest import AdapterManifest, write_manifest
    from personas.spec import display_path
    from trainer.report import HISTORY, LOSS_CURVE, REPORT, plot_loss_curve, write_history, write_report

    spec, folder, hp = run.spec, run.folder, run.hp
    base_sha = model_sha256(run.location)
    title = f"{spec.name} ({spec.slug}) {run.version}"
    # The picture and its data: the same losses and held-out points.
    held = {
        "heldout_before": metrics["heldout_loss_before"],
        "heldout_after": metrics["heldout_loss_after"],
        "final_step": int(metrics["steps"]),
    }
    plot_loss_curve(folder / LOSS_CURVE, losses, title=title, **held)
    write_history(folder / HISTORY, losses, before=before, after=after, **held)
    finished_at = _now()
    summary = {
        "persona": spec.slug,
        "version": run.version,
        "base model": f"{run.settings.model.name} (sha256 {base_sha[:12]}…)",
        "template": spec.template,
        "dialogues": ", ".join(display_path(p) for p in run.paths),
        "dataset sha256": run.data_sha,
        "device": str(run.device),
        "started": run.started_at.isoformat(timespec="seconds"),
        "finished": finished_at.isoformat(timespec="seconds"),
    }
    write_report(
        folder / REPORT,
        title=title,
        summary=summary,
        metrics=metrics,
        hyperparameters=hp.as_dict(),
        before=before,
        after=after,
        shown=run.request.shown_samples,
    )
    manifest = AdapterManifest(
        persona=spec.slug,
        version=run.version,
        base_model=run.settings.model.name,
        base_model_sha256=base_sha,
        template=spec.template,
        dataset_sha256=run.data_sha,
        hyperparameters=hp.as_dict(),
        metrics=metrics,
        started_at=run.started_at,
        finished_at=finished_at,
        tokenizer_size=len(run.tokenizer),
        dataset_files=[display_path(p) for p in run.paths],
        system_prompt=spec.raw_system_prompt(),
    )
    write_manifest(folder, manifest)
    return base_sha


class _Null:
    """A file that swallows the progress bar (`progress=False`)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
