"""The console's routes: server-rendered pages, three small JSON endpoints for the playground, and the
POST actions (activate, roll back, retry a delivery), each doing what the matching CLI command does."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import jinja2
from aiohttp import web

from bot.errors import PersonabotError
from bot.prompt_view import render_view
from bot.prompting import PromptError, Turn
from bot.prompting.types import ROLES
from bot.scheduler import plan_jobs
from bot.serve.console import auth, data
from bot.serve.console.context import ConsoleContext
from bot.serve.console.svg import loss_curve_svg
from bot.store import outbox
from personas.versions import activate_named, rollback

HERE = Path(__file__).resolve().parent
CONTEXT = web.AppKey("console_context", ConsoleContext)
TEMPLATES = web.AppKey("console_templates", jinja2.Environment)
# A local model on a busy queue may take a while; the API's own limits still apply inside.
CHAT_TIMEOUT = aiohttp.ClientTimeout(total=300)
FLASH = "personabot_console_done"  # what the last action did, shown once on the next page


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return text[:19].replace("T", " ")


def _score(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, float) and 0.0 <= value <= 1.0 else str(value)


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value from the store or a persona is text, never markup
    )
    env.filters.update(loss=_loss, when=_when, score=_score)
    return env


def _page(request: web.Request, name: str, status: int = 200, **values: Any) -> web.Response:
    flash = request.cookies.get(FLASH)
    html = (
        request.app[TEMPLATES]
        .get_template(name)
        .render(message=unquote(flash) if flash else None, prefix=auth.PREFIX, **values)
    )
    response = web.Response(text=html, status=status, content_type="text/html")
    if flash:
        response.del_cookie(FLASH, path=auth.PREFIX)
    return response


def _back(request: web.Request, path: str, message: str) -> web.HTTPSeeOther:
    """Back to a page after an action, which says what happened once (a cookie, not the URL: a link
    cannot make the console say things)."""
    response = web.HTTPSeeOther(f"{auth.PREFIX}{path}")
    response.set_cookie(
        FLASH, quote(message), path=auth.PREFIX, httponly=True, samesite="Strict", secure=request.secure
    )
    return response


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """401 and 403 as pages (or JSON for the playground's endpoints), one clear sentence each."""
    wants_json = request.path.startswith(f"{auth.PREFIX}/api/")
    try:
        return await handler(request)
    except (auth.Unauthorized, auth.Forbidden) as exc:
        status = 401 if isinstance(exc, auth.Unauthorized) else 403
        if wants_json:
            return web.json_response({"error": {"message": str(exc)}}, status=status)
        if status == 401:
            return _page(request, "login.html", status=401, error=str(exc), logged_in=False)
        return _page(request, "error.html", status=403, title="Forbidden", error=str(exc), logged_in=True)


async def home(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther(f"{auth.PREFIX}/personas")


async def login_form(request: web.Request) -> web.StreamResponse:
    return _page(request, "login.html", error=None, logged_in=False)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    secret = str(form.get("key", "")).strip()
    if not secret or await request.app[CONTEXT].authenticate(secret) is None:
        return _page(request, "login.html", status=401, error="that API key is not valid", logged_in=False)
    response = web.HTTPSeeOther(f"{auth.PREFIX}/personas")
    auth.remember(response, request, secret)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther(f"{auth.PREFIX}/login")
    auth.forget(response)
    raise response


def _names(context: ConsoleContext) -> dict[str, str]:
    return {p.slug: p.spec.name for p in context.registry.all()}


async def personas(request: web.Request) -> web.StreamResponse:
    context = request.app[CONTEXT]
    key = await auth.current_key(request, context)
    rows = await data.personas_overview(context.store, _names(context))
    return _page(request, "personas.html", personas=rows, admin=key.admin, logged_in=True)


async def version(request: web.Request) -> web.StreamResponse:
    context = request.app[CONTEXT]
    key = await auth.current_key(request, context)
    slug, name = request.match_info["slug"], request.match_info["version"]
    detail = await data.version_detail(context.store, slug, name)
    if detail is None:
        return _page(
            request,
            "error.html",
            status=404,
            title="Not found",
            error=f"{slug} has no version {name!r}",
            logged_in=True,
        )
    svg = None
    if detail["losses"]:
        svg = loss_curve_svg(
            detail["losses"],
            heldout_before=detail["heldout_before"],
            heldout_after=detail["heldout_after"],
            final_step=detail["final_step"],
        )
    return _page(request, "version.html", v=detail, svg=svg, admin=key.admin, logged_in=True)


async def _refused(request: web.Request, exc: PersonabotError) -> web.Response:
    return _page(request, "error.html", status=409, title="Refused", error=str(exc), logged_in=True)


async def activate(request: web.Request) -> web.StreamResponse:
    context = request.app[CONTEXT]
    await auth.admin_key(request, context)
    slug = request.match_info["slug"]
    name = str((await request.post()).get("version", ""))
    try:
        base = await asyncio.to_thread(context.base)
        info = await activate_named(context.store, context.settings, slug, name, base)
    except PersonabotError as exc:
        return await _refused(request, exc)
    raise _back(
        request,
        "/personas",
        f"{slug}: version {info.version} is active (held-out loss {_loss(info.heldout_loss)})",
    )


async def roll_back(request: web.Request) -> web.StreamResponse:
    context = request.app[CONTEXT]
    await auth.admin_key(request, context)
    slug = request.match_info["slug"]
    try:
        base = await asyncio.to_thread(context.base)
        info = await rollback(
            context.store,
            slug,
            base_model_sha256=base.sha256,
            tokenizer=base.tokenizer,
            base_vocab_size=base.vocab_size,
        )
    except PersonabotError as exc:
        return await _refused(request, exc)
    raise _back(request, "/personas", f"{slug}: rolled back to version {info.version}")


async def playground(request: web.Request) -> web.StreamResponse:
    context = request.app[CONTEXT]
    await auth.current_key(request, context)
    rows = await data.personas_overview(context.store, _names(context))
    return _page(request, "playground.html", personas=rows, logged_in=True)


def _turns(body: Any) -> list[Turn]:
    """The playground's messages as turns; anything malformed is one clear error."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        raise PromptError("messages: expected a list of {role, content} objects")
    turns = []
    for number, item in enumerate(messages, 1):
        role = item.get("role") if isinstance(item, dict) else None
        content = item.get("content") if isinstance(item, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise PromptError(f"messages[{number}]: needs a role ({', '.join(ROLES)}) and a text content")
        turns.append(Turn(role, content))
    return turns


async def prompt(request: web.Request) -> web.StreamResponse:
    """The exact prompt the persona answers the conversation from, as `personabot prompt --json`."""
    context = request.app[CONTEXT]
    await auth.current_key(request, context)
    try:
        body = await request.json()
        slug = str(body.get("model", "")).split("@", 1)[0]
        persona = context.registry.get(slug)
        view = await asyncio.to_thread(render_view, context.settings, persona, _turns(body))
    except (ValueError, AttributeError, PersonabotError) as exc:
        return web.json_response({"error": {"message": str(exc)}}, status=400)
    return web.json_response(view)


async def chat(request: web.Request) -> web.StreamResponse:
    """The playground's message, sent to this same process's `/v1/chat/completions` with the logged-in
    key, so it takes exactly the API's path (queue, worker, limits)."""
    context = request.app[CONTEXT]
    await auth.current_key(request, context)
    secret = request.cookies.get(auth.COOKIE, "")
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": {"message": "expected a JSON body"}}, status=400)
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not sockname:
        return web.json_response({"error": {"message": "cannot reach the API from here"}}, status=500)
    host = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
    url = f"http://{host}:{sockname[1]}/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=CHAT_TIMEOUT) as session:
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}  # key-less: the API is open too
        async with session.post(url, json=body, headers=headers) as reply:
            return web.json_response(await reply.json(content_type=None), status=reply.status)


async def operations(request: web.Request) -> web.StreamResponse:
    context = request.app[CONTEXT]
    key = await auth.current_key(request, context)
    slugs = [p.slug for p in context.registry.all()]
    plan = plan_jobs(context.settings, context.registry)[0] if context.settings.scheduler.enabled else []
    report = await data.operations(context.store, personas=slugs, plan=plan)
    return _page(request, "operations.html", ops=report, admin=key.admin, logged_in=True)


async def retry(request: web.Request) -> web.StreamResponse:
    """`personabot outbox retry ID`: a failed delivery goes back to pending, with a fresh deadline."""
    context = request.app[CONTEXT]
    await auth.admin_key(request, context)
    raw = str((await request.post()).get("id", ""))
    if not raw.isdigit():
        return _page(
            request,
            "error.html",
            status=400,
            title="Bad request",
            error=f"outbox id {raw!r} is not a number",
            logged_in=True,
        )
    deadline = timedelta(hours=context.settings.delivery.deadline_hours)
    async with context.store.transaction() as session:
        requeued = await outbox.requeue(session, [int(raw)], deadline=deadline)
    text = f"delivery {raw} requeued" if requeued else f"delivery {raw} is not failed (or gone): left alone"
    raise _back(request, "/operations", text)


def console_app(context: ConsoleContext) -> web.Application:
    """The console as an aiohttp sub-application; mount it with `app.add_subapp("/console", ...)`."""
    app = web.Application(middlewares=[errors])
    app[CONTEXT] = context
    app[TEMPLATES] = templates()
    app.router.add_get("", home)
    app.router.add_get("/", home)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/personas", personas)
    app.router.add_get("/personas/{slug}/versions/{version}", version)
    app.router.add_post("/personas/{slug}/activate", activate)
    app.router.add_post("/personas/{slug}/rollback", roll_back)
    app.router.add_get("/playground", playground)
    app.router.add_post("/api/prompt", prompt)
    app.router.add_post("/api/chat", chat)
    app.router.add_get("/operations", operations)
    app.router.add_post("/outbox/retry", retry)
    app.router.add_static("/static", HERE / "static")
    return app


async def _to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther(f"{auth.PREFIX}/personas")


def mount(app: web.Application, context: ConsoleContext) -> None:
    """Serve the console under `/console/` of `app`, and send `/` there (the one line `build_app` calls)."""
    app.add_subapp(auth.PREFIX, console_app(context))
    app.router.add_get("/", _to_console)
