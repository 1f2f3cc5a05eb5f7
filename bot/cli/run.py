"""`personabot run`: adapters, worker and scheduler in one process."""

from __future__ import annotations

import argparse

from bot.cli.common import run_async, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run the bot: every adapter with a token, the worker and the scheduler",
        description="Applies migrations, then starts every adapter configured with a token (the console only "
        "with --console), the worker (unless worker.enabled = false) and the scheduler (unless "
        "scheduler.enabled = false). SIGTERM or Ctrl-C stops it gracefully.",
    )
    p.add_argument(
        "--console", action="store_true", help="also talk to the bot in this terminal (stdin/stdout)"
    )
    p.add_argument("--channel", default="local", help="console channel id (default: local)")
    p.set_defaults(func=_run, default_log_level="INFO")


def _run(args: argparse.Namespace) -> int:
    from bot.launch import run_bot

    return run_async(run_bot(settings_from(args), console=args.console, console_channel=args.channel))
