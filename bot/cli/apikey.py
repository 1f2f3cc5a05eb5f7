"""`personabot apikey create|list|revoke`: the keys clients of `personabot serve` authenticate with."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apikey", help="API keys of `personabot serve`: create, list, revoke")
    apikey = p.add_subparsers(dest="apikey_command", metavar="ACTION", required=True)
    create = apikey.add_parser(
        "create", help="a new key; its secret is printed once, only its hash is stored"
    )
    create.add_argument("name", help="what the key is for (unique), e.g. sillytavern")
    create.add_argument("--admin", action="store_true", help="may also change personas (web console)")
    create.add_argument(
        "--rate", type=int, default=60, metavar="N", help="requests per minute (default 60; 0: unlimited)"
    )
    create.set_defaults(func=_create)
    ls = apikey.add_parser("list", help="every key: id, name, prefix, rights, rate, revoked or not")
    ls.set_defaults(func=_list)
    revoke = apikey.add_parser("revoke", help="revoke a key by id or name; its requests get 401 from now on")
    revoke.add_argument("key", metavar="ID|NAME")
    revoke.set_defaults(func=_revoke)


def _create(args: argparse.Namespace) -> int:
    from bot.cli.common import run_async, settings_from
    from bot.runtime import open_store
    from bot.serve import keys

    async def go() -> tuple[keys.ApiKey, str]:
        store = await open_store(settings_from(args))
        try:
            return await keys.create(store, args.name, admin=args.admin, rate_per_minute=args.rate)
        finally:
            await store.close()

    key, secret = run_async(go())
    print(secret)
    rights = "admin" if key.admin else "chat"
    print(
        f"key {key.id} {key.name!r} ({rights}, {_rate(key.rate_per_minute)}): keep the secret above, it is not shown again"
    )
    return 0


def _rate(per_minute: int) -> str:
    return f"{per_minute}/min" if per_minute else "no rate limit"


def _list(args: argparse.Namespace) -> int:
    from bot.cli.common import run_async, settings_from
    from bot.runtime import open_store
    from bot.serve import keys

    async def go() -> list[keys.ApiKey]:
        store = await open_store(settings_from(args))
        try:
            return await keys.list_keys(store)
        finally:
            await store.close()

    rows = run_async(go())
    if not rows:
        print("no API keys (create one with `personabot apikey create NAME`)")
    for key in rows:
        state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
        rights = "admin" if key.admin else "chat"
        print(
            f"{key.id}  {key.name}  {key.prefix}…  {rights}  {_rate(key.rate_per_minute)}  "
            f"created {key.created_at:%Y-%m-%d %H:%M}  {state}"
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from bot.cli.common import run_async, settings_from
    from bot.runtime import open_store
    from bot.serve import keys

    async def go() -> keys.ApiKey:
        store = await open_store(settings_from(args))
        try:
            return await keys.revoke(store, args.key)
        finally:
            await store.close()

    key = run_async(go())
    print(f"key {key.id} {key.name!r} revoked")
    return 0
