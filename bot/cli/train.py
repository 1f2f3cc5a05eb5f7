"""`personabot train PERSONA`: train a LoRA adapter version on the persona's dialogues.

Runs unchanged under `accelerate launch -m bot.cli train ...` or `torchrun -m bot.cli train ...`.
"""

from __future__ import annotations

import argparse
import sys

from bot.cli.common import settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a persona's LoRA adapter (assistant-only loss), evaluate it, register the version",
        description="Hyperparameters default to the persona's [training] and [lora] tables in persona.toml.",
    )
    p.add_argument("persona", help="persona slug")
    p.add_argument("--epochs", type=float, help="passes over the training conversations")
    p.add_argument("--lr", type=float, dest="learning_rate", help="peak learning rate")
    p.add_argument("--r", type=int, dest="lora_r", help="LoRA rank")
    p.add_argument("--alpha", type=int, dest="lora_alpha", help="LoRA alpha")
    p.add_argument("--dropout", type=float, dest="lora_dropout", help="LoRA dropout")
    p.add_argument("--max-steps", type=int, dest="max_steps", help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, dest="batch_size", help="packed rows per device per micro-batch")
    p.add_argument(
        "--grad-accum", type=int, dest="gradient_accumulation_steps", help="micro-batches per optimizer step"
    )
    p.add_argument("--max-seq-len", type=int, dest="max_seq_len", help="tokens per packed row")
    p.add_argument("--seed", type=int, help="held-out split, shuffling and sampling seed")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="VERSION",
        help="continue the newest unfinished run (or VERSION) from its last checkpoint",
    )
    p.add_argument(
        "--activate", action="store_true", help="make the new version the persona's active adapter"
    )
    p.add_argument("--device", help="auto, cpu or cuda (default: model.device from the config)")
    p.add_argument("--version", help="name of the new version (default: v1, v2, ...)")
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps (default 50)")
    p.add_argument(
        "--sample-tokens",
        type=int,
        default=128,
        help="longest before/after sample reply, in tokens (default 128)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="CPU threads (default: OMP_NUM_THREADS, else the cores other work leaves idle)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


OVERRIDES = (
    "epochs",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "max_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "max_seq_len",
    "seed",
)


def _train(args: argparse.Namespace) -> int:
    from bot.extras import require

    require("train", "`personabot train`")
    from trainer.audit import MaskAuditError
    from trainer.run import TrainRequest, train

    settings = settings_from(args)
    request = TrainRequest(
        persona=args.persona,
        overrides={name: getattr(args, name) for name in OVERRIDES},
        resume=args.resume,
        activate=args.activate,
        device=args.device,
        version=args.version,
        save_steps=max(1, args.save_steps),
        sample_tokens=max(1, args.sample_tokens),
        progress=not args.no_progress,
        threads=args.threads,
    )
    try:
        result = train(settings, request)
    except MaskAuditError as exc:
        print(exc.details, file=sys.stderr)
        raise
    if not result.metrics:  # a secondary process of a multi-GPU run: the main one reports
        return 0
    m = result.metrics
    print(
        f"{result.persona} {result.version}: held-out loss {m['heldout_loss_before']:.4f} -> "
        f"{m['heldout_loss_after']:.4f} ({-m['heldout_loss_drop']:+.1%}), perplexity "
        f"{m['heldout_perplexity_before']:.2f} -> {m['heldout_perplexity_after']:.2f}"
    )
    if "style_score_after" in m:
        print(
            f"{result.persona} {result.version}: {m['style_check']} style "
            f"{m['style_score_before']:.0%} -> {m['style_score_after']:.0%} of {m['style_prompts']} held-out prompts"
        )
    print(
        f"{result.persona} {result.version}: {m['steps']} steps in {m['train_seconds']:.0f}s "
        f"({m['trained_tokens_per_second']:.0f} trained tokens/s, padding {m['padding_fraction']:.1%}), "
        f"{m['wall_seconds']:.0f}s in all"
    )
    print(f"saved {result.folder} (report.md, loss_curve.png, manifest.json)")
    if result.activated:
        print(f"{result.persona}: version {result.version} is active")
    else:
        print(
            f"registered, not active; activate with: personabot persona activate {result.persona} {result.version}"
        )
    return 0
