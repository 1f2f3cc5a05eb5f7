"""`personabot eval PERSONA`: the persona answers the question set through the real path; scores."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="score a persona's replies: accuracy, style, loops, language drift, name leaks",
        description=(
            "Asks the question set through the worker's real path (renderer, adapter, sampling, loop "
            "guard) with fixed seeds, and prints the scores. An evaluated adapter version gets "
            "eval.json and eval.md (eval-group.* with --group) in its folder."
        ),
    )
    p.add_argument("persona", help="persona slug")
    p.add_argument("--questions", type=Path, help="a questions JSONL file (default: the shipped set)")
    p.add_argument("--group", action="store_true", help="ask in a simulated 3-speaker group chat")
    p.add_argument(
        "--version", help="adapter version to evaluate, or 'base' (default: the persona's active one)"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--out", type=Path, help="also write the report files into this folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from bot.cli.common import settings_from
    from bot.quality.questions import SHIPPED, read_questions
    from bot.quality.run import run_eval
    from bot.quality.target import resolve_target

    settings = settings_from(args)
    questions = read_questions(args.questions or SHIPPED)
    target = resolve_target(settings, args.persona, args.version)

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} replies", end="", file=sys.stderr, flush=True)

    report = run_eval(settings, target, questions, group=args.group, seed=args.seed, progress=progress)
    print(file=sys.stderr)
    written: list[Path] = []
    if target.adapter is not None:
        written += report.write(target.adapter)
    if args.out is not None:
        written += report.write(args.out)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.markdown(), end="")
        for path in written:
            print(f"wrote {path}")
    return 0
