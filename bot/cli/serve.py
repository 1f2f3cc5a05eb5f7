"""`personabot serve`: the OpenAI-compatible API (and the web console) over HTTP."""

from __future__ import annotations

import argparse

from bot.cli.common import run_async, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve personas over an OpenAI-compatible HTTP API",
        description="Applies migrations, then serves GET /v1/models and POST /v1/chat/completions (the "
        "persona slug, or slug@version, is the model). Requests go through the same queue as the chat "
        "platforms; a worker runs in this process unless --no-worker (or serve.worker = false). Binding "
        "to an address other than loopback needs an API key (`personabot apikey create`).",
    )
    p.add_argument("--host", help="address to listen on (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: serve.port, 8080)")
    p.add_argument(
        "--no-worker",
        action="store_true",
        help="answer with separate `personabot worker` processes instead of a worker in this one",
    )
    p.set_defaults(func=_serve, default_log_level="INFO")


def _serve(args: argparse.Namespace) -> int:
    from bot.serve.server import serve

    settings = settings_from(args)
    if args.host is not None:
        settings.serve.host = args.host
    if args.port is not None:
        settings.serve.port = args.port
    if args.no_worker:
        settings.serve.worker = False
    return run_async(serve(settings))
