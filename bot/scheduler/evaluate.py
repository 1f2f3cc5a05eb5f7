"""The retrain job's evaluation subprocess: held-out loss of several adapters on one held-out set.

    python -m bot.scheduler.evaluate [--config FILE] PERSONA EXPORT.jsonl --adapter DIR|base ... --out FILE

The held-out set is the one `bot.scheduler.train_job` trained with: the persona's dialogue files
followed by the export, split by the trainer's seeded `split_heldout`, rendered and packed as the
trainer does. Each adapter (or `base`, the base model alone) is measured with the trainer's
token-weighted assistant-only loss; the losses are written to FILE as `{"losses": [...]}` in order.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bot.config import Settings


def heldout_losses(
    settings: Settings, slug: str, data: Path | None, adapters: list[Path | None]
) -> list[float]:
    """Held-out loss of each adapter (None: the base model) on the split of the persona's dialogues plus
    `data` (None: the dialogues alone, the split `personabot train` used)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bot.generation.local import load_tokenizer
    from bot.prompting import ChatRenderer
    from bot.runtime import load_registry
    from trainer.data import read_conversations
    from trainer.hyper import from_spec
    from trainer.loss import evaluate_loss
    from trainer.packing import PackedCollator
    from trainer.prepare import prepare, raise_problems
    from trainer.run import model_location

    persona = load_registry(settings).get(slug)
    spec = persona.spec
    hp = from_spec(spec)
    location = model_location(settings)
    tokenizer = load_tokenizer(location)
    renderer = ChatRenderer(tokenizer, spec.template)
    extra = [data.resolve()] if data is not None else []
    conversations, problems = read_conversations([*persona.dialogue_paths(), *extra])
    raise_problems(problems)
    prepared = prepare(
        conversations,
        renderer,
        system=persona.system_prompt(),
        max_seq_len=hp.max_seq_len,
        heldout_fraction=hp.heldout_fraction,
        seed=hp.seed,
        lore=persona.lorebook,
        packing=hp.packing,
    )
    device = "cuda" if settings.model.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if settings.model.device.startswith("cuda:"):
        device = settings.model.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else renderer.end_of_turn_ids[0]
    collate = PackedCollator(pad_id, 1)
    rows = prepared.heldout_packed
    batches: list[dict[str, Any]] = [
        collate(rows[i : i + hp.batch_size]) for i in range(0, len(rows), hp.batch_size)
    ]
    model: Any = AutoModelForCausalLM.from_pretrained(
        location.folder, gguf_file=location.gguf_file, dtype=torch.float32, local_files_only=True
    ).to(device)  # type: ignore[arg-type]  # transformers wraps `to` with functools.wraps: mypy misreads it
    model.config.use_cache = False
    losses = []
    for adapter in adapters:
        if adapter is None:
            loss, _ = evaluate_loss(model, batches, device)
        else:
            wrapped = PeftModel.from_pretrained(model, str(adapter)).to(device)
            loss, _ = evaluate_loss(wrapped, batches, device)
            model = wrapped.unload()  # the base model again, for the next adapter
        print(f"{slug}: held-out loss {loss:.4f} ({adapter or 'base model'})", flush=True)
        losses.append(loss)
    return losses


def main(argv: list[str] | None = None) -> int:
    from bot.cli.common import settings_from
    from bot.errors import PersonabotError

    parser = argparse.ArgumentParser(prog="python -m bot.scheduler.evaluate")
    parser.add_argument("--config")
    parser.add_argument("persona")
    parser.add_argument("data", type=Path)
    parser.add_argument("--adapter", action="append", required=True, help="an adapter folder, or 'base'")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    adapters = [None if a == "base" else Path(a) for a in args.adapter]
    try:
        losses = heldout_losses(settings_from(args), args.persona, args.data, adapters)
    except PersonabotError as exc:
        print(f"personabot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    args.out.write_text(json.dumps({"losses": losses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
