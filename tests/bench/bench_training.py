"""Training throughput: personabot's packed trainer against TRL's SFTTrainer, side by side in one run.

All runs train the same model, on the same conversations (rendered once by `bot.prompting`, so the token
ids and assistant-only labels are identical), with the same LoRA config, sequence length, rows per optimizer
step, learning rate and precision (float32; TRL's bf16 and gradient checkpointing are off, as they are for
personabot on the CPU), for one epoch each. The settings default to the persona's own `persona.toml`
(what `personabot train PERSONA` runs); the flags override them.

- personabot: best-fit-decreasing packed rows with restarting position ids and the system prompt that
  every conversation starts with computed once per row, the token-weighted assistant loss with logits
  only at trained positions (`trainer.loss.AssistantLossTrainer`);
- trl-best: TRL at its best, `packing=True` with its best-fit-decreasing strategy ("bfd", which makes the
  batches padding-free: every row of a step flattened into one sequence with restarting position ids) and
  the assistant mask of every conversation (its `assistant_masks` column), so it trains the same tokens;
- trl-best-b1: the same with one packed row per forward and gradient accumulation over the step's rows
  (on a CPU without flash attention, one flattened sequence of all the rows makes attention quadratic in
  the whole step, so this can be TRL's faster setting);
- trl-padded: TRL's default, one conversation per row padded per batch (no packing).

Prints trained (assistant) tokens per second for each (steps 2..N: step 1 pays one-time costs), the
trained tokens each run saw in all (equal when they train the same tokens), personabot's ratio to each
and to the fastest TRL run (the goal: >= 1.2x TRL at its best), and personabot's padding fraction. Name a
run twice in --order (e.g. personabot,trl-best,trl-best,personabot) to average out a machine that slows
down or speeds up during the run.

    .venv/bin/python tests/bench/bench_training.py [--model DIR] [--persona pirate] [--conversations 64]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = (
    Path(os.environ.get("PERSONABOT_DATA_DIR", "/tmp/pbdata")) / "models" / "SmolLM2-135M-Instruct"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a local model folder")
    p.add_argument("--persona", default="pirate", help="builtin persona whose dialogues are trained on")
    p.add_argument("--conversations", type=int, default=64, help="conversations trained on (default 64)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument(
        "--batch-size", type=int, help="rows per optimizer step, for every run (default: the persona's)"
    )
    p.add_argument("--max-seq-len", type=int, help="row length (default: the persona's)")
    p.add_argument("--lr", type=float, help="learning rate (default: the persona's)")
    p.add_argument("--r", type=int, help="LoRA rank (default: the persona's)")
    p.add_argument("--alpha", type=int, help="LoRA alpha (default: the persona's)")
    p.add_argument("--dropout", type=float, help="LoRA dropout (default: the persona's)")
    p.add_argument(
        "--order",
        default="personabot,trl-best,trl-best-b1",
        help="runs in order, comma-separated, from: personabot, trl-best, trl-best-b1, trl-padded; a name "
        "given twice is averaged (default personabot,trl-best,trl-best-b1)",
    )
    p.add_argument(
        "--threads", type=int, help="CPU threads for every run (default: the cores idle at the start)"
    )
    return p.parse_args()


class Clock:
    """Times optimizer steps 2..N (step 1 pays one-time costs: kernel selection, allocator warm-up).

    Step k trains batches (k-1)*accumulation+1 .. k*accumulation, so the timed steps train every batch
    after the first step's.
    """

    def __init__(self, collate: CountingCollator, accumulation: int = 1) -> None:
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == 1:
                    clock.start = time.perf_counter()
                clock.end = time.perf_counter()

        self.callback = _Callback()
        self.collate = collate
        self.accumulation = accumulation
        self.start = self.end = 0.0

    def result(self, rows: int) -> dict[str, float]:
        # The data loader collates a batch ahead, so count by batch, not at the clock's start.
        trained = sum(self.collate.per_batch[self.accumulation :])
        seconds = self.end - self.start
        if seconds <= 0:
            raise SystemExit("too few steps to time: raise --conversations or --epochs")
        return {
            "seconds": seconds,
            "trained": trained,
            "all_trained": sum(self.collate.per_batch),
            "padding": self.collate.padding,
            "rows": rows,
        }


class CountingCollator:
    """Wraps a collator and counts trained targets and padding in what it hands to the model."""

    def __init__(self, inner: Any, pad_key: str | None) -> None:
        self.inner = inner
        self.pad_key = pad_key
        self.per_batch: list[int] = []  # trained targets of each batch, in order
        self.real = 0
        self.total = 0

    def __call__(self, rows: list[Any]) -> dict[str, Any]:
        batch = self.inner(rows)
        self.per_batch.append(int((batch["labels"][:, 1:] != -100).sum()))
        self.total += batch["input_ids"].numel()
        self.real += (
            int(batch[self.pad_key].sum()) if self.pad_key else sum(len(r["input_ids"]) for r in rows)
        )
        return batch

    @property
    def padding(self) -> float:
        return 1 - self.real / self.total if self.total else 0.0


def settings(args: argparse.Namespace) -> Any:
    """The persona's hyperparameters with the flags given on the command line, and the persona."""
    from personas.registry import PersonaRegistry
    from trainer.hyper import from_spec, with_overrides

    persona = PersonaRegistry.discover(entry_points=False).get(args.persona)
    overrides = {
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "learning_rate": args.lr,
        "lora_r": args.r,
        "lora_alpha": args.alpha,
        "lora_dropout": args.dropout,
        "epochs": args.epochs,
        "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "seed": 0,
        "packing": True,
    }
    return with_overrides(from_spec(persona.spec), overrides), persona


def load_rows(args: argparse.Namespace, hp: Any, persona: Any) -> tuple[Any, list[Any]]:
    from bot.basemodel import ModelLocation
    from bot.generation.local import load_tokenizer
    from bot.prompting import ChatRenderer
    from trainer.data import read_conversations
    from trainer.examples import render_rows

    tokenizer = load_tokenizer(ModelLocation(args.model))
    renderer = ChatRenderer(tokenizer, persona.spec.template)
    conversations, problems = read_conversations(persona.dialogue_paths())
    if problems:
        raise SystemExit(f"bad dialogues: {problems[0]}")
    rows, _ = render_rows(
        renderer,
        conversations[: args.conversations],
        system=persona.spec.system_prompt or None,
        max_tokens=hp.max_seq_len,
    )
    return tokenizer, rows


def fresh_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    return model


def lora_config(hp: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=hp.lora_r,
        lora_alpha=hp.lora_alpha,
        lora_dropout=hp.lora_dropout,
        target_modules=list(hp.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def run_personabot(
    args: argparse.Namespace, hp: Any, tokenizer: Any, rows: list[Any], out: Path
) -> dict[str, float]:
    from peft import get_peft_model
    from transformers.trainer_callback import PrinterCallback

    from trainer.loss import AssistantLossTrainer
    from trainer.packing import PackedCollator, PackedDataset, pack_sharing_prefix
    from trainer.run import training_arguments

    packed = pack_sharing_prefix([(r.input_ids, r.labels) for r in rows], hp.max_seq_len)
    targs = training_arguments(hp, out, "cpu", save_steps=10**9)
    targs.save_strategy = "no"
    model = get_peft_model(fresh_model(args), lora_config(hp))
    collate = CountingCollator(PackedCollator(tokenizer.pad_token_id or 0), pad_key=None)
    trainer = AssistantLossTrainer(
        model=model, args=targs, train_dataset=PackedDataset(packed), data_collator=collate
    )
    trainer.remove_callback(PrinterCallback)
    clock = Clock(collate)
    trainer.add_callback(clock.callback)
    trainer.train()
    return clock.result(len(packed))


def run_trl(
    args: argparse.Namespace,
    hp: Any,
    tokenizer: Any,
    rows: list[Any],
    out: Path,
    *,
    packing: bool,
    rows_per_forward: int,
) -> dict[str, float]:
    """One TRL `SFTTrainer` run on the pre-tokenized conversations and their assistant masks."""
    from datasets import Dataset, disable_progress_bars
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()

    data = Dataset.from_list(
        [{"input_ids": r.input_ids, "assistant_masks": [int(v != -100) for v in r.labels]} for r in rows]
    )
    accumulation = hp.batch_size // rows_per_forward
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=rows_per_forward,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=hp.epochs,
        learning_rate=hp.learning_rate,
        max_length=hp.max_seq_len,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        packing=packing,
        packing_strategy="bfd",  # best-fit decreasing; makes the batches padding-free
        seed=0,
    )
    trainer = SFTTrainer(
        model=fresh_model(args),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(hp),
    )
    collate = CountingCollator(trainer.data_collator, pad_key=None if packing else "attention_mask")
    trainer.data_collator = collate
    trainer.remove_callback(PrinterCallback)
    clock = Clock(collate, accumulation)
    trainer.add_callback(clock.callback)
    trainer.train()
    return clock.result(len(trainer.train_dataset))


# TRL's runs: (packing, rows per forward; None: every row of the step in one forward)
TRL_RUNS: dict[str, tuple[bool, int | None]] = {
    "trl-best": (True, None),
    "trl-best-b1": (True, 1),
    "trl-padded": (False, None),
}


def run(
    name: str, args: argparse.Namespace, hp: Any, tokenizer: Any, rows: list[Any], out: Path
) -> dict[str, float]:
    if name == "personabot":
        return run_personabot(args, hp, tokenizer, rows, out)
    packing, per_forward = TRL_RUNS[name]
    return run_trl(
        args, hp, tokenizer, rows, out, packing=packing, rows_per_forward=per_forward or hp.batch_size
    )


def main() -> int:
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args = parse_args()
    import torch

    from bot.cpu_threads import IdleCoreThreads

    order = args.order.split(",")
    if set(order) - {"personabot", *TRL_RUNS} or "personabot" not in order or len(set(order)) < 2:
        raise SystemExit(f"--order: name personabot and at least one of {', '.join(TRL_RUNS)}")
    hp, persona = settings(args)
    # The same fixed thread count for every run (a busy machine makes extra threads much slower).
    threads = args.threads or IdleCoreThreads().settle()
    torch.set_num_threads(threads)
    tokenizer, rows = load_rows(args, hp, persona)
    trained = sum(sum(1 for v in r.labels[1:] if v != -100) for r in rows)
    print(
        f"{len(rows)} {args.persona} conversations, {sum(len(r.input_ids) for r in rows)} tokens, {trained} trained; "
        f"{hp.batch_size} rows of <= {hp.max_seq_len} per step, lr {hp.learning_rate:g}, LoRA r={hp.lora_r} "
        f"alpha={hp.lora_alpha} dropout={hp.lora_dropout:g}, {hp.epochs:g} epoch(s), float32 on CPU "
        f"({threads} of {os.cpu_count()} cores)"
    )
    totals: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(order):
            r = run(name, args, hp, tokenizer, rows, Path(tmp) / f"{name}-{index}")
            print(
                f"{name:>12}: {r['trained']} trained tokens in {r['seconds']:.1f}s (steps 2..N) = "
                f"{r['trained'] / r['seconds']:.1f} trained tokens/s ({r['rows']} rows, padding {r['padding']:.1%}, "
                f"{r['all_trained']} trained tokens in all)",
                flush=True,
            )
            total = totals.setdefault(name, {"trained": 0.0, "seconds": 0.0, "padding": r["padding"]})
            total["trained"] += r["trained"]
            total["seconds"] += r["seconds"]
            gc.collect()
    rate = {name: t["trained"] / t["seconds"] for name, t in totals.items()}
    ours = rate.pop("personabot")
    for name, theirs in rate.items():
        print(f"ratio personabot / {name}: {ours / theirs:.2f}x")
    best = max(rate, key=lambda name: rate[name])
    print(f"ratio personabot / TRL at its best ({best}): {ours / rate[best]:.2f}x (goal >= 1.2)")
    print(f"personabot padding fraction: {totals['personabot']['padding']:.2%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
