"""Helpers shared by CLI commands."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from bot.config import Settings, load_settings
from bot.logs import register_secret

T = TypeVar("T")


def settings_from(args: argparse.Namespace) -> Settings:
    """Load settings for a command and register its secrets for log redaction."""
    settings = load_settings(args.config)
    for section, env in ((settings.discord, "DISCORD_TOKEN"), (settings.telegram, "TELEGRAM_TOKEN")):
        token = section.resolve_token(env)
        if token is not None:
            register_secret(token.get_secret_value())
    return settings


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)
