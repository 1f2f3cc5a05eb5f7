"""Console log-in: the user pastes an API key once; it is kept in an HttpOnly, SameSite=Strict cookie.

HttpOnly keeps the key away from page scripts; SameSite=Strict keeps other sites' forms from posting
with it (the console changes things only on POST). Reading a page needs any valid key, changing
anything needs an admin key; a request without one gets 401 (with the log-in form), a non-admin 403.
"""

from __future__ import annotations

from aiohttp import web

from bot.serve.console.context import ConsoleContext, ConsoleKey

COOKIE = "personabot_console_key"
PREFIX = "/console"


class Unauthorized(Exception):
    """No key, or a key the store does not know (any more)."""


class Forbidden(Exception):
    """A valid key that may not do this (not an admin key)."""


async def current_key(request: web.Request, context: ConsoleContext) -> ConsoleKey:
    secret = request.cookies.get(COOKIE, "")
    key = await context.authenticate(secret)
    if key is None and not secret:
        raise Unauthorized("log in with an API key to use the console")
    if key is None:
        raise Unauthorized("that API key is not valid (revoked, or never created): log in again")
    return key


async def admin_key(request: web.Request, context: ConsoleContext) -> ConsoleKey:
    key = await current_key(request, context)
    if not key.admin:
        raise Forbidden("this needs an admin API key (personabot apikey create NAME --admin)")
    return key


def remember(response: web.StreamResponse, request: web.Request, secret: str) -> None:
    response.set_cookie(
        COOKIE,
        secret,
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,  # over TLS (or behind a proxy that says so), never sent in clear
    )


def forget(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path=PREFIX)
