"""`personabot dataset export PERSONA [--since DATE] [--out FILE]`: a persona's opted-in conversations as
training JSONL. It joins the `personabot dataset` group, whichever module creates that group first."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from bot.cli.common import run_async, settings_from
from bot.errors import PersonabotError


def _dataset_actions(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `personabot dataset` group's sub-parsers (the convention bot.cli.dataset also follows)."""
    existing = sub.choices.get("dataset")
    if existing is not None:
        return existing.get_default("_dataset_actions")
    parser = sub.add_parser("dataset", help="training data: check it, export conversations")
    actions = parser.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    parser.set_defaults(_dataset_actions=actions)
    return actions


def register(sub: argparse._SubParsersAction) -> None:
    exp = _dataset_actions(sub).add_parser(
        "export",
        help="write a persona's conversations with opted-in users as training JSONL",
        description='Exports, one conversation per line ({"messages": [...]}), the persona\'s replies and the '
        "messages they answered, from users who opted in (/optin) and wrote them while opted in; users who "
        "opted out or used /forget are left out.",
    )
    exp.add_argument("persona", metavar="PERSONA")
    exp.add_argument(
        "--since", type=_date, help="only messages from this date or time on (ISO 8601, UTC if no zone)"
    )
    exp.add_argument(
        "--out", type=Path, help="output file (default: <data_dir>/exports/<persona>/<time>.jsonl)"
    )
    exp.set_defaults(func=_export)


def _date(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date like 2026-01-31 or 2026-01-31T09:00"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _export(args: argparse.Namespace) -> int:
    from datetime import timedelta

    from bot.events import utcnow
    from bot.export import ExportResult, export_persona, exports_dir
    from bot.runtime import load_registry, open_store

    settings = settings_from(args)
    slug = load_registry(settings).get(args.persona).slug
    out = args.out or exports_dir(settings.data_dir) / slug / f"{utcnow():%Y%m%d-%H%M%S}.jsonl"
    if out.exists() and out.is_dir():
        raise PersonabotError(f"--out {out}: is a folder; give a file name")

    async def go() -> ExportResult:
        store = await open_store(settings)
        try:
            return await export_persona(
                store,
                slug,
                out,
                since=args.since,
                conversation_gap=timedelta(minutes=settings.scheduler.conversation_gap_minutes),
                sources=args.out is None,  # the data folder's exports are scrubbed after /forget and /optout
            )
        finally:
            await store.close()

    try:
        result = run_async(go())
    except OSError as exc:
        raise PersonabotError(f"--out {out}: cannot write: {exc.strerror or exc}") from None
    print(
        f"exported {result.conversations} conversation(s), {result.turns} turns, from {result.users} user(s) to {out}"
    )
    return 0
