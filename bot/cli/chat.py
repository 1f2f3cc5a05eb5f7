"""`personabot chat`: talk to a persona in the terminal."""

from __future__ import annotations

import argparse

from bot.cli.common import run_async, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a persona in the terminal (works with piped stdin)")
    p.add_argument("--persona", help="persona slug; binds it to this terminal channel")
    p.add_argument("--channel", default="local", help="console channel id; the history continues per channel")
    p.set_defaults(func=_chat)


def _chat(args: argparse.Namespace) -> int:
    from bot.chat import run_chat

    settings = settings_from(args)
    run_async(run_chat(settings, persona=args.persona, channel=args.channel))
    return 0
