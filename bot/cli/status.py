"""`personabot status`: the health of a deployment, from its database."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="components seen, reply queue, active adapters, scheduled jobs' last runs",
        description="Reads the store only, so it works from any machine that reaches the database.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    from bot.cli.common import run_async, settings_from
    from bot.errors import PersonabotError
    from bot.runtime import load_registry, open_store
    from bot.status import collect_status, render_status

    settings = settings_from(args)
    try:  # a broken persona folder must not hide the deployment's health
        slugs = [p.slug for p in load_registry(settings).all()]
    except PersonabotError:
        slugs = []

    async def go() -> dict:
        store = await open_store(settings)
        try:
            return await collect_status(store, personas=slugs)
        finally:
            await store.close()

    report = run_async(go())
    print(json.dumps(report, indent=2) if args.json else render_status(report))
    return 0
