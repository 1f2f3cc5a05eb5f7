"""Scheduled posts: a persona's cron entry becomes reply jobs, answered by the worker like any reply.

Each (occurrence, channel) is one reply job with the dedupe key
`cron:<persona>:<entry>:<occurrence, UTC ISO>:<channel id>`, so however often an occurrence is fired
(two processes, a retry, a restart half-way through) it is queued once, and so posted once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import ChannelKind, ChannelRef
from bot.scheduler.jobs import PostEntry
from bot.store import Store, conversations, jobs
from bot.store.models import Channel, ChannelPersona
from personas.registry import PersonaRegistry


def dedupe_key(entry: PostEntry, occurrence: datetime, channel_id: int) -> str:
    return f"cron:{entry.persona}:{entry.index}:{occurrence.astimezone(UTC).isoformat()}:{channel_id}"


async def _listed_channels(session: AsyncSession, keys: tuple[str, ...]) -> list[tuple[int, str]]:
    found = []
    for key in keys:
        platform, _, rest = key.partition(":")
        external_id, _, thread = rest.partition("/")
        existing = await conversations.find_channel(
            session, ChannelRef(platform, external_id, thread_id=thread)
        )
        if existing is None:  # a chat the bot has not heard from yet: it may still post there
            existing = await conversations.upsert_channel(
                session, ChannelRef(platform, external_id, ChannelKind.GROUP, thread_id=thread)
            )
        found.append((existing, key))
    return found


async def _bound_channels(session: AsyncSession, persona: str) -> list[tuple[int, str]]:
    rows = await session.execute(
        select(Channel.id, Channel.platform, Channel.external_id, Channel.thread_id)
        .join(ChannelPersona, ChannelPersona.channel_id == Channel.id)
        .where(ChannelPersona.persona == persona)
        .order_by(Channel.id)
    )
    return [(cid, f"{p}:{e}/{t}" if t else f"{p}:{e}") for cid, p, e, t in rows]


async def queue_post(
    store: Store, registry: PersonaRegistry, entry: PostEntry, occurrence: datetime
) -> dict[str, Any]:
    """Queue the entry's post for `occurrence` in each of its channels; returns what was queued.

    No channel at all (none listed, none bound) is not an error: the post is skipped, with the reason.
    """
    persona = registry.get(entry.persona)  # PersonaError when the persona is gone
    async with store.transaction() as session:
        targets = (
            await _listed_channels(session, entry.channels)
            if entry.channels
            else await _bound_channels(session, persona.slug)
        )
        if not targets:
            return {
                "persona": persona.slug,
                "queued": [],
                "already_queued": [],
                "reason": f"{entry.source}: no channel to post in: list `channels` in the entry, or bind "
                f"the persona to a channel with /persona {persona.slug}",
            }
        queued: list[str] = []
        already: list[str] = []
        for channel_id, key in targets:
            job_id = await jobs.enqueue(
                session,
                channel_id=channel_id,
                persona=persona.slug,
                dedupe_key=dedupe_key(entry, occurrence, channel_id),
                kind="scheduled",
                prompt=entry.prompt,
            )
            (queued if job_id is not None else already).append(key)
    return {"persona": persona.slug, "queued": queued, "already_queued": already}
