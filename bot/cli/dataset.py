"""`personabot dataset check`: is this training data usable, and how much of it is trained on?

Sub-commands live under `personabot dataset`; `register_check` adds `check`, and other modules can add
their own actions (e.g. `export`) to the same group with `dataset_actions(sub)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bot.cli.common import settings_from
from bot.errors import PersonabotError


def dataset_actions(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `personabot dataset` group's sub-parsers (created once)."""
    existing = sub.choices.get("dataset")
    if existing is None:
        parser = sub.add_parser("dataset", help="training data: check it")
        actions = parser.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
        parser.set_defaults(_dataset_actions=actions)
        return actions
    return existing.get_default("_dataset_actions")


def register(sub: argparse._SubParsersAction) -> None:
    actions = dataset_actions(sub)
    check = actions.add_parser(
        "check",
        help="count conversations and tokens, list every bad line (exit 1 on errors)",
        description='Reads JSONL ({"messages": [...]}) and tutorial-format (<s>[INST] … [/INST] …</s>) '
        "files, renders them as the trainer does, audits the loss masks, and reports.",
    )
    check.add_argument(
        "files", nargs="*", type=Path, metavar="FILE", help="dialogue files (default: the persona's)"
    )
    check.add_argument("--persona", help="render with this persona's template, system prompt and max_seq_len")
    check.add_argument(
        "--max-seq-len", type=int, help="context window rows are cut to (default: the persona's, 512)"
    )
    check.add_argument("--json", action="store_true", help="print one JSON object")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from bot.generation.local import load_tokenizer
    from bot.prompting import ChatRenderer
    from bot.runtime import load_registry
    from personas.spec import TrainingSettings
    from trainer.prepare import check_dataset
    from trainer.run import model_location

    settings = settings_from(args)
    files: list[Path] = list(args.files)
    # Without a persona: the model's own template, no system prompt, the default window.
    template, system, max_seq_len = "model", None, TrainingSettings().max_seq_len
    lore = None
    if args.persona:
        persona = load_registry(settings).get(args.persona)
        spec = persona.spec
        template, system, max_seq_len = spec.template, persona.system_prompt(), spec.training.max_seq_len
        lore = persona.lorebook
        files = files or persona.dialogue_paths()
        if not files:
            raise PersonabotError(f"persona {args.persona!r} has no dialogue files")
    elif not files:
        raise PersonabotError("give dialogue FILEs, or --persona SLUG to check that persona's dialogues")
    max_seq_len = args.max_seq_len or max_seq_len
    if max_seq_len < 16:
        raise PersonabotError(f"--max-seq-len {max_seq_len}: must be at least 16")
    renderer = ChatRenderer(load_tokenizer(model_location(settings)), template)
    stats = check_dataset(files, renderer, system=system, max_seq_len=max_seq_len, lore=lore)
    if args.json:
        print(json.dumps(stats.as_dict(), indent=2))
    else:
        print(f"conversations   {stats.conversations}")
        print(f"tokens          {stats.tokens}")
        print(f"trained tokens  {stats.trained_tokens}")
        print(f"truncated       {stats.truncated}  (cut to {max_seq_len} tokens, still trained)")
        print(f"dropped         {stats.dropped}  (nothing left to train after the cut)")
        print(f"errors          {len(stats.errors)}")
        for problem in stats.errors:
            print(f"error: {problem}", file=sys.stderr)
    return 1 if stats.errors else 0
