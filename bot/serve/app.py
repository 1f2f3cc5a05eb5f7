"""The web application of `personabot serve`: the OpenAI-compatible API under `/v1/`.

The web console is mounted under `/console/` (and `/` leads there) in `build_app`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from adapters.api import ApiAdapter
from bot.config import Settings
from bot.serve.auth import Handler, KeyCheck
from bot.serve.completions import Completions
from bot.serve.console.context import ConsoleContext, store_keys
from bot.serve.console.pages import mount as mount_console
from bot.serve.errors import ApiError
from bot.store import Store
from personas.registry import PersonaRegistry
from personas.versions import active_versions

log = logging.getLogger(__name__)


@dataclass
class ServeContext:
    """What the routes of one `personabot serve` process share."""

    store: Store
    registry: PersonaRegistry
    settings: Settings
    # The `api` platform: the outbox delivers the API's replies to the requests waiting here.
    adapter: ApiAdapter = field(default_factory=ApiAdapter)
    keys: KeyCheck = field(init=False)
    completions: Completions = field(init=False)

    def __post_init__(self) -> None:
        self.keys = KeyCheck(self.store, host=self.settings.serve.host)
        self.completions = Completions(self.store, self.registry, self.adapter, self.settings.serve)


CONTEXT = web.AppKey("serve_context", ServeContext)


def context(request: web.Request) -> ServeContext:
    return request.app[CONTEXT]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as an OpenAI error object: refusals with their status, the unexpected as 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if not request.path.startswith("/v1/") or exc.status < 400:
            raise
        return ApiError(exc.status, exc.reason).response()
    except Exception:
        if not request.path.startswith("/v1/"):
            raise  # the console's pages have their own error pages
        log.exception("%s %s failed", request.method, request.path)
        failed = ApiError(500, "The server had an error while processing your request.", type="server_error")
        return failed.response()


async def list_models(request: web.Request) -> web.Response:
    """`GET /v1/models`: one entry per persona, with its active adapter version (null: the base model)."""
    ctx = context(request)
    async with ctx.store.transaction() as session:
        active = await active_versions(session)
    data = [_model_entry(p.slug, active.get(p.slug)) for p in ctx.registry.all()]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    ctx = context(request)
    slug = request.match_info["model"]
    if slug not in ctx.registry:
        raise ApiError(404, f"The model `{slug}` does not exist.", param="model", code="model_not_found")
    async with ctx.store.transaction() as session:
        active = await active_versions(session)
    return web.json_response(_model_entry(slug, active.get(slug)))


def _model_entry(slug: str, active: tuple[str, str] | None) -> dict[str, Any]:
    return {
        "id": slug,
        "object": "model",
        "created": 0,
        "owned_by": "personabot",
        "active_version": active[0] if active is not None else None,
    }


def build_app(ctx: ServeContext) -> web.Application:
    """The API's routes behind the error and key middlewares, and the web console under `/console/`."""
    app = web.Application(middlewares=[openai_errors, ctx.keys.middleware])
    app[CONTEXT] = ctx
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model}", get_model)
    app.router.add_post("/v1/chat/completions", ctx.completions.handle)
    mount_console(app, ConsoleContext(ctx.store, ctx.settings, ctx.registry, store_keys(ctx.store, ctx.keys)))
    return app
