"""The `heartbeats` table: one row per running component, refreshed by `bot.heartbeat`, read by status."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import utcnow
from bot.store.conversations import _insert_for
from bot.store.models import Heartbeat


async def beat(session: AsyncSession, component: str, kind: str, detail: dict[str, Any]) -> None:
    """Insert or refresh one component's row (`started_at` stays that of its first beat)."""
    now = utcnow()
    insert = _insert_for(session)(Heartbeat).values(
        component=component, kind=kind, detail=detail, started_at=now, seen_at=now
    )
    await session.execute(
        insert.on_conflict_do_update(
            index_elements=["component"], set_={"detail": insert.excluded.detail, "seen_at": now}
        )
    )


async def listing(session: AsyncSession) -> list[Heartbeat]:
    """Every component's row, by kind then name."""
    return list(
        (await session.execute(select(Heartbeat).order_by(Heartbeat.kind, Heartbeat.component))).scalars()
    )
