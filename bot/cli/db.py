"""`personabot db upgrade|current`: the store's schema."""

from __future__ import annotations

import argparse

from bot.cli.common import run_async, settings_from


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="database schema")
    db = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db.add_parser("upgrade", help="apply pending migrations")
    up.set_defaults(func=_upgrade)
    cur = db.add_parser("current", help="show the schema revision")
    cur.set_defaults(func=_current)


def _upgrade(args: argparse.Namespace) -> int:
    from bot.runtime import open_store

    async def go() -> str:
        store = await open_store(settings_from(args))
        await store.close()
        return store.engine.url.render_as_string(hide_password=True)

    print(f"database is up to date: {run_async(go())}")
    return 0


def _current(args: argparse.Namespace) -> int:
    from bot.migrate import current_revision, head_revision
    from bot.store import Store

    async def go() -> str | None:
        store = Store(settings_from(args).resolved_database_url)
        try:
            return await current_revision(store.engine)
        finally:
            await store.close()

    print(f"current: {run_async(go()) or 'empty'}  head: {head_revision()}")
    return 0
