"""The migrated schema is exactly the models' schema, on both backends."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from bot.migrate import current_revision, head_revision
from bot.store import Store
from bot.store.models import Base


async def test_autogenerate_finds_no_difference(store: Store) -> None:
    def diff(connection):  # type: ignore[no-untyped-def]
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return compare_metadata(context, Base.metadata)

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []
    assert await current_revision(store.engine) == head_revision()


async def test_upgrade_is_idempotent(store: Store) -> None:
    await store.upgrade()
    async with store.engine.connect() as conn:
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert {"channels", "users", "messages", "reply_jobs", "outbox", "adapter_versions"} <= tables
