"""Training throughput: personabot's packed trainer against TRL's SFTTrainer, side by side in one run.

Both train the same model, on the same conversations (rendered once by `bot.prompting`, so the token ids
and assistant-only labels are identical), with the same LoRA config, sequence length, batch size,
learning rate and precision, for one epoch each:

- personabot: best-fit-decreasing packed rows, the token-weighted assistant loss with logits only at
  trained positions (`trainer.loss.AssistantLossTrainer`, what `personabot train` runs);
- TRL: `SFTTrainer` on the pre-tokenized conversations with their `assistant_masks` (assistant-only
  loss), one conversation per row, padded per batch (TRL's default; no packing). Gradient checkpointing
  and bf16, which TRL turns on by default, are off, as they are for personabot on the CPU.

Prints trained (assistant) tokens per second for both, their ratio (goal >= 1.5) and personabot's
padding fraction (goal < 5%). The default is a short run (a few minutes on a CPU with SmolLM2-135M);
raise --conversations / --epochs for a steadier figure.

    .venv/bin/python tests/bench/bench_training.py [--model DIR] [--persona pirate] [--conversations 32]
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
    p.add_argument("--conversations", type=int, default=32, help="conversations trained on (default 32)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=4, help="rows per step, for both trainers")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--order", default="personabot,trl", help="which runs first (default personabot,trl)")
    p.add_argument(
        "--threads", type=int, help="CPU threads for both runs (default: the cores idle at the start)"
    )
    return p.parse_args()


class Clock:
    """Times steps 2..N (step 1 pays one-time costs: kernel selection, allocator warm-up).

    Both runs use gradient accumulation 1, so step k trains batch k.
    """

    def __init__(self, collate: CountingCollator) -> None:
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == 1:
                    clock.start = time.perf_counter()
                clock.end = time.perf_counter()

        self.callback = _Callback()
        self.collate = collate
        self.start = self.end = 0.0

    def result(self, rows: int) -> dict[str, float]:
        # The data loader collates a batch ahead, so count by batch, not at the clock's start.
        trained = sum(self.collate.per_batch[1:])
        seconds = self.end - self.start
        if seconds <= 0:
            raise SystemExit("too few steps to time: raise --conversations or --epochs")
        return {"seconds": seconds, "trained": trained, "padding": self.collate.padding, "rows": rows}


class CountingCollator:
    """Wraps a collator and counts trained targets and padding in what it hands to the model."""

    def __init__(self, inner: Any, pad_key: str | None) -> None:
        self.inner = inner
        self.pad_key = pad_key
        self.trained = 0
        self.per_batch: list[int] = []  # trained targets of each batch, in order
        self.real = 0
        self.total = 0

    def __call__(self, rows: list[Any]) -> dict[str, Any]:
        batch = self.inner(rows)
        self.per_batch.append(int((batch["labels"][:, 1:] != -100).sum()))
        self.trained += self.per_batch[-1]
        self.total += batch["input_ids"].numel()
        self.real += (
            int(batch[self.pad_key].sum()) if self.pad_key else sum(len(r["input_ids"]) for r in rows)
        )
        return batch

    @property
    def padding(self) -> float:
        return 1 - self.real / self.total if self.total else 0.0


def load_rows(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    from bot.basemodel import ModelLocation
    from bot.generation.local import load_tokenizer
    from bot.prompting import ChatRenderer
    from personas.registry import PersonaRegistry
    from trainer.data import read_conversations
    from trainer.examples import render_rows

    persona = PersonaRegistry.discover(entry_points=False).get(args.persona)
    tokenizer = load_tokenizer(ModelLocation(args.model))
    renderer = ChatRenderer(tokenizer, persona.spec.template)
    conversations, problems = read_conversations(persona.dialogue_paths())
    if problems:
        raise SystemExit(f"bad dialogues: {problems[0]}")
    rows, _ = render_rows(
        renderer,
        conversations[: args.conversations],
        system=persona.spec.system_prompt or None,
        max_tokens=args.max_seq_len,
    )
    return tokenizer, rows


def fresh_model(args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, local_files_only=True)
    model.config.use_cache = False
    return model


def lora_config(args: argparse.Namespace) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        bias="none",
        task_type="CAUSAL_LM",
    )


def run_personabot(args: argparse.Namespace, tokenizer: Any, rows: list[Any], out: Path) -> dict[str, float]:
    from peft import get_peft_model
    from transformers.trainer_callback import PrinterCallback

    from trainer.hyper import Hyperparameters
    from trainer.loss import AssistantLossTrainer
    from trainer.packing import PackedCollator, PackedDataset, pack
    from trainer.run import training_arguments

    hp = Hyperparameters(
        epochs=args.epochs,
        learning_rate=args.lr,
        batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_seq_len=args.max_seq_len,
        warmup_ratio=0.0,
        weight_decay=0.0,
        heldout_fraction=0.1,
        seed=0,
        packing=True,
        lora_r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=(),
    )
    packed = pack([(r.input_ids, r.labels) for r in rows], args.max_seq_len)
    targs = training_arguments(hp, out, "cpu", save_steps=10**9)
    targs.save_strategy = "no"
    model = get_peft_model(fresh_model(args), lora_config(args))
    collate = CountingCollator(PackedCollator(tokenizer.pad_token_id or 0), pad_key=None)
    trainer = AssistantLossTrainer(
        model=model, args=targs, train_dataset=PackedDataset(packed), data_collator=collate
    )
    trainer.remove_callback(PrinterCallback)
    clock = Clock(collate)
    trainer.add_callback(clock.callback)
    trainer.train()
    return clock.result(len(packed))


def run_trl(args: argparse.Namespace, tokenizer: Any, rows: list[Any], out: Path) -> dict[str, float]:
    from datasets import Dataset, disable_progress_bars
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    disable_progress_bars()

    data = Dataset.from_list(
        [{"input_ids": r.input_ids, "assistant_masks": [int(v != -100) for v in r.labels]} for r in rows]
    )
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        max_length=args.max_seq_len,
        lr_scheduler_type="linear",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        packing=False,
        seed=0,
    )
    trainer = SFTTrainer(
        model=fresh_model(args),
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config(args),
    )
    trainer.data_collator = CountingCollator(trainer.data_collator, pad_key="attention_mask")
    trainer.remove_callback(PrinterCallback)
    clock = Clock(trainer.data_collator)
    trainer.add_callback(clock.callback)
    trainer.train()
    return clock.result(len(rows))


def main() -> int:
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    args = parse_args()
    import torch

    from bot.cpu_threads import IdleCoreThreads

    # The same fixed thread count for both runs (a busy machine makes extra threads much slower).
    threads = args.threads or IdleCoreThreads().settle()
    torch.set_num_threads(threads)
    tokenizer, rows = load_rows(args)
    trained = sum(sum(1 for v in r.labels if v != -100) for r in rows)
    print(
        f"{len(rows)} {args.persona} conversations, {sum(len(r.input_ids) for r in rows)} tokens, {trained} trained; "
        f"batch {args.batch_size}, max_seq_len {args.max_seq_len}, LoRA r={args.r} alpha={args.alpha} "
        f"dropout={args.dropout}, {args.epochs:g} epoch(s), float32 on CPU ({threads} of {os.cpu_count()} cores)"
    )
    runners = {"personabot": run_personabot, "trl": run_trl}
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.order.split(","):
            results[name] = runners[name](args, tokenizer, rows, Path(tmp) / name)
            r = results[name]
            r["tps"] = r["trained"] / r["seconds"]
            print(
                f"{name:>10}: {r['trained']} trained tokens in {r['seconds']:.1f}s (steps 2..N) = "
                f"{r['tps']:.1f} trained tokens/s ({r['rows']} rows, padding {r['padding']:.1%})",
                flush=True,
            )
            gc.collect()
    ours, theirs = results["personabot"], results["trl"]
    ratio = ours["tps"] / theirs["tps"]
    print(f"ratio personabot / trl: {ratio:.2f}x (goal >= 1.5)")
    print(f"personabot padding fraction: {ours['padding']:.2%} (goal < 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
