"""`/optin` and `/optout`: may a user's conversations be used to retrain personas?

The state is per user (`users.training_opt_in`) with the time it last changed, so an export only takes
messages written while the user was opted in: opting in later does not pull in older messages.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bot.events import AuthorRef, utcnow
from bot.store.conversations import upsert_user
from bot.store.models import User


async def set_training_opt_in(
    session: AsyncSession, author: AuthorRef, opted_in: bool, *, at: datetime | None = None
) -> bool:
    """Record the user's choice, made at `at` (the command's own time; default now).

    Returns False when it was already that (nothing changes then).
    """
    user_id = await upsert_user(session, author)
    current = (await session.execute(select(User.training_opt_in).where(User.id == user_id))).scalar_one()
    if bool(current) == opted_in:
        return False
    await session.execute(
        update(User)
        .where(User.id == user_id)
        .values(training_opt_in=opted_in, opt_in_changed_at=at or utcnow())
    )
    return True


async def training_opt_in(session: AsyncSession, author: AuthorRef) -> tuple[bool, datetime | None]:
    """The user's current choice and when it was made (False, None for users never seen)."""
    row = (
        await session.execute(
            select(User.training_opt_in, User.opt_in_changed_at).where(
                User.platform == author.platform, User.external_id == author.external_id
            )
        )
    ).one_or_none()
    return (bool(row[0]), row[1]) if row is not None else (False, None)
