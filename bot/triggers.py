"""Which personas answer a message: the trigger policy, the same on every platform."""

from __future__ import annotations

import re

from bot.events import Incoming
from personas.registry import Persona, PersonaRegistry


def _names(persona: Persona) -> list[str]:
    return [n for n in {persona.slug.lower(), persona.spec.name.lower()} if n]


def named_persona(text: str, registry: PersonaRegistry) -> Persona | None:
    """The persona a message addresses by name: `pirate, ...`, `Pirate: ...` or `@pirate` anywhere."""
    lowered = text.lower()
    for persona in registry.all():
        if not persona.spec.triggers.name:
            continue
        for name in _names(persona):
            escaped = re.escape(name)
            if re.match(rf"^\s*{escaped}\s*[,:!]", lowered) or re.search(
                rf"(?<!\w)@{escaped}(?!\w)", lowered
            ):
                return persona
    return None


def keyword_persona(text: str, candidates: list[Persona]) -> Persona | None:
    lowered = text.lower()
    for persona in candidates:
        for keyword in persona.spec.triggers.keywords:
            if re.search(rf"(?<!\w){re.escape(keyword.lower())}(?!\w)", lowered):
                return persona
    return None


def responders(
    event: Incoming, *, bound: list[str], default: str, registry: PersonaRegistry
) -> list[Persona]:
    """The personas that should reply to `event` (usually one, or none).

    A persona named in the message answers. Otherwise the channel's persona (the first bound one, or
    the default) answers a DM, a mention, a reply to the bot, a keyword, or any message in a bound
    channel, each as its `triggers` allow.
    """
    named = named_persona(event.text, registry)
    if named is not None:
        return [named]
    slugs = [s for s in bound if s in registry] or [default]
    candidates = [registry.get(s) for s in slugs]
    primary = candidates[0]
    t = primary.spec.triggers
    if event.is_direct and t.direct_messages:
        return [primary]
    if event.mentions_bot and t.mentions:
        return [primary]
    if event.replies_to_bot and t.replies:
        return [primary]
    if bound and t.bound_channels:
        return [primary]
    keyword = keyword_persona(event.text, candidates)
    return [keyword] if keyword is not None else []
