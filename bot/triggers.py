"""Which personas answer a message: the trigger policy, the same on every platform."""

from __future__ import annotations

import logging
import re

from bot.events import Incoming
from personas.registry import Persona, PersonaRegistry

log = logging.getLogger(__name__)


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

    A persona named in the message answers. Otherwise a persona of the channel (the bound ones, or the
    default) whose keyword the message holds answers; else the channel's first persona answers a DM, a
    mention, a reply to the bot, or any message in a bound channel, each as its `triggers` allow.
    """
    named = named_persona(event.text, registry)
    if named is not None:
        return [named]
    slugs = [s for s in bound if s in registry] or ([default] if default in registry else [])
    if not slugs:  # a misconfigured default_persona must not turn every message into a crash
        log.warning("no persona answers in %s: default persona %r is unknown", event.channel.key, default)
        return []
    candidates = [registry.get(s) for s in slugs]
    # A keyword picks the persona that owns it, also among the several personas sharing a channel.
    keyword = keyword_persona(event.text, candidates)
    if keyword is not None:
        return [keyword]
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
    return []
