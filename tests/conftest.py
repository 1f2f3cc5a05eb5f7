"""Shared fixtures: a migrated store on SQLite and on PostgreSQL, and an isolated data directory."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from bot.store import Store
from tests import head_start

POSTGRES_URL_ENV = "PERSONABOT_TEST_POSTGRES_URL"


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test: tiny matrices run steadier so on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's config, tokens or data directory."""
    for name in list(os.environ):
        if name.startswith("PERSONABOT_") and name != POSTGRES_URL_ENV:
            monkeypatch.delenv(name)
    for name in ("DISCORD_TOKEN", "TELEGRAM_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PERSONABOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # The fake platforms listen on 127.0.0.1; httpx and aiohttp obey proxy variables.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Tests that call setup_logging (as the CLI does) must not change logging for later tests."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    levels = {
        name: logger.level
        for name, logger in logging.Logger.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    yield
    root.handlers[:], root.level = handlers, level
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))


def postgres_admin_url() -> str | None:
    return os.environ.get(POSTGRES_URL_ENV) or None


class PostgresDatabases:
    """Creates a throwaway database per test on the server in PERSONABOT_TEST_POSTGRES_URL."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = make_url(admin_url).set(drivername="postgresql+asyncpg")

    async def _admin(self, sql: str) -> None:
        import asyncpg

        url = self.admin_url
        conn = await asyncpg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            database=url.database,
        )
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create(self) -> str:
        name = f"pbtest_{uuid.uuid4().hex[:12]}"
        await self._admin(f'CREATE DATABASE "{name}"')
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    async def drop(self, url: str) -> None:
        name = make_url(url).database
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database URL on each backend (PostgreSQL from PERSONABOT_TEST_POSTGRES_URL)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    admin = postgres_admin_url()
    if admin is None:
        pytest.skip(f"{POSTGRES_URL_ENV} is not set")
    dbs = PostgresDatabases(admin)
    url = asyncio.run(dbs.create())
    try:
        yield url
    finally:
        asyncio.run(dbs.drop(url))


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Store]:
    """A migrated store on each backend."""
    s = Store(db_url)
    await s.upgrade()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    """A migrated SQLite store, for tests where the platform, not the database, is the point."""
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    await s.upgrade()
    try:
        yield s
    finally:
        await s.close()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the head starts the selected tests name (tests/head_start.py) before the first test runs."""
    if session.config.option.collectonly:
        return
    for item in session.items:
        for mark in item.iter_markers("head_start"):
            head_start.begin(mark.kwargs["prepare"])


def pytest_unconfigure(config: pytest.Config) -> None:
    head_start.finish()
