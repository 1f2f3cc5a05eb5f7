"""`personabot outbox list|retry`: replies that are not (yet) posted, and putting failed ones back."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("outbox", help="undelivered replies: list them, retry failed ones")
    outbox = p.add_subparsers(dest="outbox_command", metavar="ACTION", required=True)
    ls = outbox.add_parser("list", help="replies not yet posted, newest first")
    ls.add_argument(
        "--failed", action="store_true", help="only those given up on (failed, or outcome unknown)"
    )
    ls.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    ls.set_defaults(func=_list)
    retry = outbox.add_parser(
        "retry", help="post failed replies again (a fresh deadline; an unknown outcome may post twice)"
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("ids", nargs="*", type=int, default=[], metavar="ID", help="outbox ids")
    which.add_argument("--all", action="store_true", help="every failed or unknown-outcome reply")
    retry.set_defaults(func=_retry)


def _list(args: argparse.Namespace) -> int:
    from bot.cli.common import run_async, settings_from
    from bot.runtime import open_store
    from bot.store import outbox

    async def go() -> list[outbox.DeliveryRow]:
        store = await open_store(settings_from(args))
        try:
            async with store.transaction() as session:
                return await outbox.listing(session, failed_only=args.failed, limit=args.limit)
        finally:
            await store.close()

    rows = run_async(go())
    if not rows:
        print("no failed replies" if args.failed else "nothing waiting: every reply is posted")
        return 0
    for row in rows:
        code = f" [{row.error_code}]" if row.error_code else ""
        error = f": {row.error}" if row.error else ""
        text = " ".join(row.text.split())
        preview = text if len(text) <= 60 else text[:59] + "…"
        print(
            f"{row.id}  {row.status}  {row.channel}  {row.created_at:%Y-%m-%d %H:%M:%S}  "
            f"attempts {row.attempts}{code}{error}\n    {preview}"
        )
    return 0


def _retry(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from bot.cli.common import run_async, settings_from
    from bot.runtime import open_store
    from bot.store import outbox

    if not args.all and not args.ids:
        raise SystemExit("personabot outbox retry: give outbox ids or --all")
    settings = settings_from(args)

    async def go() -> list[int]:
        store = await open_store(settings)
        try:
            async with store.transaction() as session:
                return await outbox.requeue(
                    session,
                    None if args.all else list(args.ids),
                    deadline=timedelta(hours=settings.delivery.deadline_hours),
                )
        finally:
            await store.close()

    requeued = run_async(go())
    missing = sorted(set(args.ids) - set(requeued))
    if requeued:
        print(
            f"requeued {len(requeued)} repl{'y' if len(requeued) == 1 else 'ies'}: {', '.join(map(str, requeued))}"
        )
    else:
        print("nothing to retry")
    if missing:
        print(f"not failed (or no such reply), left alone: {', '.join(map(str, missing))}")
        return 1
    return 0
