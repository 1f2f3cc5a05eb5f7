"""The `personabot` command line.

Each command group lives in its own module with a `register(subparsers)` function that adds its
sub-commands and sets `func` (a callable taking the parsed args and returning an exit code).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bot import __version__
from bot.errors import PersonabotError

# Modules that add sub-commands, in the order `--help` lists them.
COMMAND_MODULES = [
    "bot.cli.chat",
    "bot.cli.db",
    "bot.cli.model",
    "bot.cli.persona",
    "bot.cli.prompt",
    "bot.cli.dataset",
    "bot.cli.train",
    "bot.cli.eval",
    "bot.cli.run",
    "bot.cli.worker",
    "bot.cli.serve",
    "bot.cli.apikey",
    "bot.cli.status",
    "bot.cli.outbox",
    "bot.cli.schedule",
    "bot.cli.export",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="personabot", description="Chat bots with persona plugins.")
    parser.add_argument(
        "--config", help="path of personabot.toml (default: $PERSONABOT_CONFIG or ./personabot.toml)"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("--version", action="version", version=f"personabot {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Long-running commands (run, worker) default to INFO; one-shot commands stay quiet.
    base = logging.getLevelName(getattr(args, "default_log_level", "WARNING"))
    level = base if not args.verbose else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    from bot.logs import setup_logging

    setup_logging(logging.getLevelName(min(level, base)))
    try:
        return int(args.func(args) or 0)
    except PersonabotError as exc:
        print(f"personabot: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ModuleNotFoundError as exc:
        from bot.extras import missing_extra

        missing = missing_extra(exc, f"`personabot {args.command}`")
        if missing is None:
            raise
        print(f"personabot: error: {missing}", file=sys.stderr)
        return missing.exit_code
    except KeyboardInterrupt:
        print("personabot: interrupted", file=sys.stderr)
        return 130
