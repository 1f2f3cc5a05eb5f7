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
    from bot.scheduler import plan_jobs
    from bot.spool import spool_report
    from bot.status import collect_status, render_spool, render_status
    from bot.store.engine import database_unreachable

    settings = settings_from(args)
    try:  # a broken persona folder must not hide the deployment's health
        registry = load_registry(settings)
        slugs = [p.slug for p in registry.all()]
        plan = plan_jobs(settings, registry)[0] if settings.scheduler.enabled else []
    except PersonabotError:
        slugs, plan = [], []

    spool_dir = settings.data_dir / "spool"

    async def go() -> dict:
        store = await open_store(settings)
        try:
            return await collect_status(store, personas=slugs, spool_dir=spool_dir, plan=plan)
        finally:
            await store.close()

    try:
        report = run_async(go())
    except Exception as exc:
        if not database_unreachable(exc):
            raise
        # The database is away: what this machine still knows is what waits in its spool.
        spool = spool_report(spool_dir)
        if args.json:
            print(json.dumps({"database": f"unreachable: {type(exc).__name__}", "spool": spool}, indent=2))
        else:
            print(f"database: unreachable ({type(exc).__name__}: {exc})")
            print("\n".join(render_spool(spool)[1:]))
        return 1
    print(json.dumps(report, indent=2) if args.json else render_status(report))
    return 0
