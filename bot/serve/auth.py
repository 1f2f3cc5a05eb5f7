"""Who is asking: the API key of a request (`Authorization: Bearer pb-…`), checked before any route.

With no key configured at all, a server on a loopback address is open to local clients, as the
key-less `local` key (serve refuses another address then); once one key exists, every request needs a
valid one. A server on another address always needs a key, even after every key is revoked.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from bot.serve import keys
from bot.serve.errors import ApiError
from bot.store import Store

# The key of requests to a key-less, loopback-only server: local users can run the CLI anyway.
LOCAL_KEY = keys.ApiKey(
    id=0, name="local", admin=True, rate_per_minute=0, prefix="", created_at=datetime(2026, 1, 1, tzinfo=UTC)
)
API_KEY = web.RequestKey("api_key", keys.ApiKey)
# How long "are there any keys?" is believed: a key created meanwhile closes the open door this soon.
_KEYS_EXIST_TTL = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    """Only this machine can reach the address (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class KeyCheck:
    """Authenticates requests to the paths it guards and records the key on the request."""

    def __init__(self, store: Store, *, host: str, prefixes: tuple[str, ...] = ("/v1/",)) -> None:
        self.store = store
        self.prefixes = prefixes
        # Served beyond loopback, a key is always required, even once every key is revoked.
        self.may_open = is_loopback(host)
        self._keys_exist: tuple[float, bool] | None = None

    async def _open(self) -> bool:
        if not self.may_open:
            return False
        now = time.monotonic()
        if self._keys_exist is None or now - self._keys_exist[0] > _KEYS_EXIST_TTL:
            self._keys_exist = (now, await keys.any_active(self.store))
        return not self._keys_exist[1]

    async def key_of(self, request: web.Request) -> keys.ApiKey:
        """The request's key, or ApiError 401."""
        secret = bearer(request)
        if secret is None:
            if await self._open():
                return LOCAL_KEY
            raise ApiError(
                401,
                "You didn't provide an API key. Send it as `Authorization: Bearer pb-…` "
                "(create one with `personabot apikey create NAME`).",
                code="invalid_api_key",
            )
        key = await keys.authenticate(self.store, secret)
        if key is None:
            raise ApiError(401, "Incorrect API key provided (unknown or revoked).", code="invalid_api_key")
        return key

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(self.prefixes):
            request[API_KEY] = await self.key_of(request)
        return await handler(request)


def api_key(request: web.Request) -> keys.ApiKey:
    """The key `KeyCheck` accepted for this request."""
    return request[API_KEY]
