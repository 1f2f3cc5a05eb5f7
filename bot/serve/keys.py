"""API keys of `personabot serve`: created, listed and revoked by an operator, checked on every request.

A key is a random 32-byte token shown once at creation (`pb-` + 43 url-safe characters). The store keeps
only its sha256: the token carries 256 bits of entropy, so a plain hash cannot be brute-forced and a
leaked database grants nothing. The visible prefix tells keys apart in `personabot apikey list`.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select

from bot.errors import PersonabotError
from bot.store import Store
from bot.store.models import ApiKeyRecord

SECRET_PREFIX = "pb-"
# "pb-" plus the first characters of the random part: enough to tell keys apart, useless to guess one.
VISIBLE_CHARS = len(SECRET_PREFIX) + 6
DEFAULT_RATE_PER_MINUTE = 60


class ApiKeyError(PersonabotError):
    """An `apikey` command was given a name or id that does not fit."""


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    admin: bool
    rate_per_minute: int  # requests per minute; 0: unlimited
    prefix: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    @classmethod
    def of(cls, row: ApiKeyRecord) -> ApiKey:
        return cls(
            id=row.id,
            name=row.name,
            admin=row.admin,
            rate_per_minute=row.rate_per_minute,
            prefix=row.prefix,
            created_at=row.created_at,
            revoked_at=row.revoked_at,
        )


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


async def create(
    store: Store, name: str, *, admin: bool = False, rate_per_minute: int = DEFAULT_RATE_PER_MINUTE
) -> tuple[ApiKey, str]:
    """A new key and its secret (the only time the secret exists outside the client)."""
    name = name.strip()
    if not name or len(name) > 128 or name.isdigit():
        raise ApiKeyError(f"key name {name!r}: 1 to 128 characters, not only digits (ids are numbers)")
    if rate_per_minute < 0:
        raise ApiKeyError(f"--rate {rate_per_minute}: requests per minute, 0 (unlimited) or more")
    secret = new_secret()
    async with store.transaction() as session:
        taken = await session.scalar(select(ApiKeyRecord.id).where(ApiKeyRecord.name == name))
        if taken is not None:
            raise ApiKeyError(f"key name {name!r} is taken (key {taken}); revoke it or choose another name")
        row = ApiKeyRecord(
            name=name,
            prefix=secret[:VISIBLE_CHARS],
            secret_sha256=hash_secret(secret),
            admin=admin,
            rate_per_minute=rate_per_minute,
            created_at=datetime.now(UTC),
        )
        session.add(row)
        await session.flush()
        return ApiKey.of(row), secret


async def list_keys(store: Store, *, include_revoked: bool = True) -> list[ApiKey]:
    async with store.transaction() as session:
        query = select(ApiKeyRecord).order_by(ApiKeyRecord.id)
        if not include_revoked:
            query = query.where(ApiKeyRecord.revoked_at.is_(None))
        return [ApiKey.of(row) for row in await session.scalars(query)]


async def any_active(store: Store) -> bool:
    """Is at least one unrevoked key configured? (Binding beyond loopback needs one.)"""
    async with store.transaction() as session:
        count = await session.scalar(
            select(func.count()).select_from(ApiKeyRecord).where(ApiKeyRecord.revoked_at.is_(None))
        )
        return bool(count)


async def revoke(store: Store, id_or_name: str) -> ApiKey:
    """Revoke a key by id or name; requests with it get 401 from then on."""
    async with store.transaction() as session:
        query = select(ApiKeyRecord)
        query = (
            query.where(ApiKeyRecord.id == int(id_or_name))
            if id_or_name.isdigit()
            else query.where(ApiKeyRecord.name == id_or_name)
        )
        row = await session.scalar(query.with_for_update())
        if row is None:
            raise ApiKeyError(f"no API key {id_or_name!r} (see `personabot apikey list`)")
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
        return ApiKey.of(row)


async def authenticate(store: Store, secret: str) -> ApiKey | None:
    """The key a request's secret belongs to; None for an unknown or revoked one."""
    if not secret.startswith(SECRET_PREFIX):
        return None
    async with store.transaction() as session:
        row = await session.scalar(
            select(ApiKeyRecord).where(ApiKeyRecord.secret_sha256 == hash_secret(secret))
        )
        if row is None or row.revoked_at is not None:
            return None
        return ApiKey.of(row)
