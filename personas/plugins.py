"""Persona plugin hooks: an optional `plugin.py` in a persona folder.

A plugin is a plain Python file with up to two functions; both are optional::

    # personas/pirate/plugin.py
    from personas.plugins import PromptContext

    def before_prompt(ctx: PromptContext) -> str | None:
        '''Extra context for this reply, appended to the system prompt (None: nothing to add).'''
        return f"Today is {ctx.now:%A %d %B %Y}."

    def after_generation(ctx: PromptContext, reply: str) -> str | None:
        '''The reply to post: `reply` itself, a rewrite, or None (or "") to post nothing (a veto).'''
        return None if "kraken" in reply.lower() else reply

Hooks run in the worker for every reply, so they must be quick plain functions (no `async def`). A hook
that raises, or returns the wrong type, is logged and the reply goes on as if the hook did not exist:
a plugin can never crash the bot. Personas defined in code by a package (entry points) pass an object with
the same two functions as `Persona.hooks` instead of a file.

The worker calls `run_before_prompt` and `run_after_generation`; nothing else here is for it.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from bot.errors import PersonaError
from personas.registry import Persona
from personas.spec import display_path

log = logging.getLogger(__name__)

HOOK_NAMES = ("before_prompt", "after_generation")


@dataclass(frozen=True)
class PromptContext:
    """What a hook knows about the reply being written."""

    persona: str  # the persona's slug
    channel: str  # the channel key, `platform:id` or `platform:id/thread`
    platform: str  # "discord", "telegram", "console"
    is_direct: bool  # a DM rather than a group channel
    now: datetime  # timezone-aware UTC
    last_user_text: str  # the message being answered ("" for a scheduled post)
    channel_title: str = ""
    author: str = ""  # display name of the user being answered
    scheduled_prompt: str | None = None  # the instruction of a scheduled post


@dataclass(frozen=True)
class _Loaded:
    stamp: tuple[int, int]  # (mtime_ns, size): an edited plugin.py is loaded again
    module: ModuleType | None
    error: str | None


_cache: dict[Path, _Loaded] = {}
_lock = threading.Lock()


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return (st.st_mtime_ns, st.st_size)


def _import_file(path: Path, slug: str) -> ModuleType:
    # A name of its own per persona, so two plugins never replace each other in sys.modules.
    name = f"personabot_plugins.{slug}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling inside the plugin look themselves up here
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _check_hooks(module: Any, source: str) -> None:
    for name in HOOK_NAMES:
        hook = getattr(module, name, None)
        if hook is None:
            continue
        if not callable(hook):
            raise PersonaError(f"{source}: {name} is not a function")
        if inspect.iscoroutinefunction(hook):
            raise PersonaError(f"{source}: {name} must be a plain function, not async def")


def load_plugin(persona: Persona) -> Any:
    """The persona's hooks object (its `plugin.py` module, or `Persona.hooks`), or None when it has none.

    Raises `PersonaError` naming the file when `plugin.py` does not import or its hooks are malformed;
    `personabot persona validate` reports that. Modules are cached until the file changes.
    """
    if persona.hooks is not None:
        _check_hooks(persona.hooks, f"{persona.source}: hooks")
        return persona.hooks
    path = persona.plugin_path
    if path is None:
        return None
    path = path.resolve()
    stamp = _stamp(path)
    with _lock:
        cached = _cache.get(path)
        if cached is None or cached.stamp != stamp:
            try:
                module = _import_file(path, persona.slug)
                _check_hooks(module, display_path(path))
                cached = _Loaded(stamp, module, None)
            except PersonaError as exc:
                cached = _Loaded(stamp, None, str(exc))
            except (Exception, SystemExit) as exc:  # the plugin author's error, reported as one line
                cached = _Loaded(
                    stamp, None, f"{display_path(path)}: cannot load: {type(exc).__name__}: {exc}"
                )
            _cache[path] = cached
    if cached.error is not None:
        raise PersonaError(cached.error)
    return cached.module


def _hooks_or_none(persona: Persona) -> Any:
    try:
        return load_plugin(persona)
    except PersonaError as exc:
        # Logged at every use rather than once, so a broken plugin stays visible in the logs.
        log.error("persona %s: plugin disabled: %s", persona.slug, exc)
        return None


def _call(persona: Persona, name: str, *args: Any) -> tuple[bool, Any]:
    """(True, result) when the hook exists and returned; (False, None) when absent or it failed."""
    hooks = _hooks_or_none(persona)
    hook = getattr(hooks, name, None) if hooks is not None else None
    if hook is None:
        return False, None
    try:
        result = hook(*args)
    except Exception:
        log.exception("persona %s: %s hook raised; using the default behaviour", persona.slug, name)
        return False, None
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        log.error(
            "persona %s: %s hook returned an awaitable; hooks must be plain functions", persona.slug, name
        )
        return False, None
    return True, result


def run_before_prompt(persona: Persona, ctx: PromptContext) -> str | None:
    """Extra context text for the system prompt, or None (no hook, nothing to add, or the hook failed)."""
    ran, result = _call(persona, "before_prompt", ctx)
    if not ran or result is None:
        return None
    if not isinstance(result, str):
        log.error(
            "persona %s: before_prompt returned %s, not str; ignored", persona.slug, type(result).__name__
        )
        return None
    return result if result.strip() else None


def run_after_generation(persona: Persona, ctx: PromptContext, reply: str) -> str | None:
    """The reply to post: the hook's rewrite, `reply` unchanged (no hook, or it failed), or None (vetoed)."""
    ran, result = _call(persona, "after_generation", ctx, reply)
    if not ran:
        return reply
    if result is None or (isinstance(result, str) and not result.strip()):
        log.info("persona %s: after_generation vetoed a reply in %s", persona.slug, ctx.channel)
        return None
    if not isinstance(result, str):
        log.error(
            "persona %s: after_generation returned %s, not str or None; reply kept",
            persona.slug,
            type(result).__name__,
        )
        return reply
    return result


def has_hooks(persona: Persona) -> list[str]:
    """The hook names a persona defines (raises `PersonaError` when its plugin does not load)."""
    hooks = load_plugin(persona)
    return [name for name in HOOK_NAMES if hooks is not None and getattr(hooks, name, None) is not None]
