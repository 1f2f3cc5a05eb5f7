"""`personabot persona ...`: list, inspect and validate personas; activate adapter versions; cards."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.cli.common import run_async, settings_from
from bot.config import Settings
from bot.errors import PersonaError

if TYPE_CHECKING:  # imported where used: each subcommand loads only what it needs
    from personas.registry import Persona, PersonaRegistry
    from personas.versions import BaseModelFacts, VersionInfo


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("persona", help="personas, their adapter versions, character cards")
    persona = p.add_subparsers(dest="persona_command", metavar="ACTION", required=True)

    ls = persona.add_parser("list", help="every persona, its source, active version and held-out loss")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    ls.set_defaults(func=_list)

    show = persona.add_parser("show", help="one persona's settings and adapter versions")
    show.add_argument("slug")
    show.set_defaults(func=_show)

    check = persona.add_parser("validate", help="check persona files, dialogues, plugins and cards")
    check.add_argument("slug", nargs="?", help="only this persona (default: all)")
    check.set_defaults(func=_validate)

    act = persona.add_parser("activate", help="answer with a trained adapter version")
    act.add_argument("slug")
    act.add_argument("version")
    act.set_defaults(func=_activate)

    back = persona.add_parser("rollback", help="reactivate the version active before the current one")
    back.add_argument("slug")
    back.set_defaults(func=_rollback)

    off = persona.add_parser("deactivate", help="answer with the base model, no adapter")
    off.add_argument("slug")
    off.set_defaults(func=_deactivate)

    imp = persona.add_parser(
        "import-card", help="make a persona from a character card (.json, .png or .charx)"
    )
    imp.add_argument("file", type=Path)
    imp.add_argument("--slug", help="the new persona's slug (default: from the card's name, transliterated)")
    imp.add_argument("--user-name", help="what {{user}} becomes (default: User)")
    imp.add_argument("--dest", type=Path, help="folder to write into (default: personas_dir)")
    imp.add_argument("--force", action="store_true", help="replace an imported persona of that slug")
    imp.set_defaults(func=_import_card)

    exp = persona.add_parser(
        "export-card", help="write a persona as a character card (.json, .png or .charx)"
    )
    exp.add_argument("slug")
    exp.add_argument(
        "--out",
        type=Path,
        help="output file (default: ./<slug>.json); .png embeds it in the avatar, .charx is a V3 zip",
    )
    exp.add_argument(
        "--examples", type=int, default=5, help="dialogues to include as mes_example (default 5)"
    )
    exp.set_defaults(func=_export_card)


def _registry(settings: Settings) -> PersonaRegistry:
    from personas.registry import PersonaRegistry

    return PersonaRegistry.from_settings(settings)


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


async def _versions(settings: Settings, persona: str | None = None) -> list[VersionInfo]:
    from bot.runtime import open_store
    from personas.versions import list_versions

    store = await open_store(settings)
    try:
        async with store.transaction() as session:
            return await list_versions(session, persona)
    finally:
        await store.close()


def _list(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    registry = _registry(settings)
    active = {v.persona: v for v in run_async(_versions(settings)) if v.is_active}
    items: list[dict[str, Any]] = []  # printed as JSON
    for p in registry.all():
        version = active.get(p.slug)
        items.append(
            {
                "slug": p.slug,
                "name": p.spec.name,
                "source": p.source,
                "default": p.slug == settings.default_persona,
                "active_version": version.version if version else None,
                "heldout_loss": version.heldout_loss if version else None,
            }
        )
    if args.json:
        print(json.dumps(items, indent=2))
        return 0
    rows = [["SLUG", "NAME", "SOURCE", "ACTIVE VERSION", "HELD-OUT LOSS"]]
    for item in items:
        slug = item["slug"] + (" *" if item["default"] else "")
        rows.append(
            [
                slug,
                item["name"],
                item["source"],
                item["active_version"] or "base",
                _loss(item["heldout_loss"]),
            ]
        )
    print(_table(rows))
    print("* default persona")
    return 0


def _show(args: argparse.Namespace) -> int:
    from personas.plugins import HOOK_NAMES, load_plugin
    from personas.spec import display_path

    settings = settings_from(args)
    persona = _registry(settings).get(args.slug)
    spec = persona.spec
    print(f"{spec.name} ({spec.slug})")
    print(f"source: {persona.source}")
    print(f"folder: {display_path(persona.folder)}")
    if spec.description:
        print(f"description: {spec.description}")
    print(f"template: {spec.template}   context window: {spec.context_window or 'model default'}")
    s = spec.sampling
    print(
        f"sampling: temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k}, "
        f"repetition_penalty {s.repetition_penalty}, max_new_tokens {s.max_new_tokens}"
    )
    t = spec.triggers
    on = [n for n in ("direct_messages", "mentions", "replies", "bound_channels", "name") if getattr(t, n)]
    print(
        f"triggers: {', '.join(on) or 'none'}" + (f"; keywords {', '.join(t.keywords)}" if t.keywords else "")
    )
    for post in spec.schedule:
        print(f"schedule: {post.cron} ({post.timezone}): {post.prompt}")
    print(f"dialogues: {', '.join(spec.dialogues) or 'none'}")
    hooks = load_plugin(persona)
    names = [n for n in HOOK_NAMES if hooks is not None and getattr(hooks, n, None) is not None]
    print(f"plugin hooks: {', '.join(names) or 'none'}")
    print(f"greetings: {len(persona.greetings())} ({spec.greeting_choice})")
    if persona.lorebook is not None:
        print(f"lorebooks: {', '.join(spec.lorebooks)} ({len(persona.lorebook.entries)} entries)")
    print("system prompt:")
    for line in (persona.system_prompt() or "(none)").splitlines():
        print(f"  {line}")
    versions = run_async(_versions(settings, spec.slug))
    if not versions:
        print("adapter versions: none (answers with the base model)")
        return 0
    rows = [["", "VERSION", "HELD-OUT LOSS", "CREATED", "ACTIVATED", "PATH"]]
    for v in versions:
        rows.append(
            [
                "*" if v.is_active else "",
                v.version,
                _loss(v.heldout_loss),
                f"{v.created_at:%Y-%m-%d %H:%M}",
                f"{v.activated_at:%Y-%m-%d %H:%M}" if v.activated_at else "-",
                v.path,
            ]
        )
    print("adapter versions (* active):")
    print(_table(rows))
    return 0


def _validate(args: argparse.Namespace) -> int:
    from personas.registry import scan, user_personas_dir
    from personas.validate import validate_persona

    settings = settings_from(args)
    personas, problems = scan(user_personas_dir(settings))
    if args.slug:
        chosen = [p for p in personas if p.slug == args.slug]
        if not chosen and not problems:
            known = ", ".join(sorted(p.slug for p in personas))
            raise PersonaError(f"unknown persona {args.slug!r}; available: {known}")
        personas = chosen
        problems = [m for m in problems if f"/{args.slug}/" in m or f"'{args.slug}'" in m]
    for persona in personas:
        facts, found = validate_persona(persona)
        status = "ok" if not found else "FAILED"
        print(f"{status}  {persona.slug} ({persona.source}): {', '.join(facts)}")
        problems += found
    for message in problems:
        print(f"error: {message}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
        return 1
    return 0


def _base(settings: Settings) -> BaseModelFacts:
    from personas.versions import base_model_facts

    return base_model_facts(settings)


async def _activate_async(settings: Settings, slug: str, version: str) -> VersionInfo:
    from bot.runtime import open_store
    from personas.versions import activate_named

    base = _base(settings)
    store = await open_store(settings)
    try:
        return await activate_named(store, settings, slug, version, base)
    finally:
        await store.close()


def _template_note(persona: Persona, path: str) -> None:
    from personas.manifest import read_manifest

    try:
        manifest = read_manifest(Path(path))
    except PersonaError:
        return
    if manifest.template != persona.spec.template:
        print(
            f"warning: trained with template {manifest.template!r}; persona.toml now says "
            f"{persona.spec.template!r}, so replies are rendered differently from training",
            file=sys.stderr,
        )


def _activate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    persona = _registry(settings).get(args.slug)
    info = run_async(_activate_async(settings, args.slug, args.version))
    _template_note(persona, info.path)
    print(f"{args.slug}: version {info.version} is active (held-out loss {_loss(info.heldout_loss)})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from personas.versions import rollback

    settings = settings_from(args)
    persona = _registry(settings).get(args.slug)
    base = _base(settings)

    async def go() -> VersionInfo:
        from bot.runtime import open_store

        store = await open_store(settings)
        try:
            return await rollback(
                store,
                args.slug,
                base_model_sha256=base.sha256,
                tokenizer=base.tokenizer,
                base_vocab_size=base.vocab_size,
            )
        finally:
            await store.close()

    info = run_async(go())
    _template_note(persona, info.path)
    print(f"{args.slug}: rolled back to version {info.version} (held-out loss {_loss(info.heldout_loss)})")
    return 0


def _deactivate(args: argparse.Namespace) -> int:
    from personas.versions import deactivate

    settings = settings_from(args)
    _registry(settings).get(args.slug)

    async def go() -> VersionInfo | None:
        from bot.runtime import open_store

        store = await open_store(settings)
        try:
            return await deactivate(store, args.slug)
        finally:
            await store.close()

    info = run_async(go())
    if info is None:
        print(f"{args.slug}: no adapter was active; it answers with the base model")
    else:
        print(f"{args.slug}: version {info.version} deactivated; it answers with the base model")
    return 0


def _import_card(args: argparse.Namespace) -> int:
    from personas.cards import card_slug, import_card, read_card
    from personas.registry import user_personas_dir
    from personas.spec import display_path

    settings = settings_from(args)
    dest = args.dest or user_personas_dir(settings)
    registry = _registry(settings)
    slug = args.slug
    if slug is None:
        # Read twice (cheap) so a clash is reported before anything is written.
        slug = card_slug(read_card(args.file))
    if slug in registry:
        existing = registry.get(slug)
        if existing.folder.resolve() != (dest / slug).resolve():
            raise PersonaError(
                f"persona {slug!r} already exists ({existing.source}, {display_path(existing.folder)}); "
                "choose another with --slug"
            )
    persona = import_card(args.file, dest, slug=slug, user=args.user_name, force=args.force)
    dialogues = sum(1 for path in persona.dialogue_paths() for line in path.open() if line.strip())
    print(f"imported {persona.spec.name} as persona {persona.slug!r} into {display_path(persona.folder)}")
    print(f"{dialogues} example dialogues; try it: personabot chat --persona {persona.slug}")
    if dest.resolve() != user_personas_dir(settings).resolve():
        print(
            f"note: set personas_dir = {str(dest)!r} in personabot.toml so the bot finds it", file=sys.stderr
        )
    return 0


def _export_card(args: argparse.Namespace) -> int:
    from personas.cards import export_card

    settings = settings_from(args)
    persona = _registry(settings).get(args.slug)
    out = args.out or Path(f"{persona.slug}.json")
    if args.examples < 0:
        raise PersonaError("--examples must be 0 or more")
    card = export_card(persona, out, max_examples=args.examples)
    version = "V3" if card["spec"] == "chara_card_v3" else "V2"
    print(f"wrote {out} (Character Card {version})")
    return 0
