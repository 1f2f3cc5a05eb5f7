"""Logging set-up with secret redaction: a token never reaches a log line, even inside a URL."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

_SECRETS: set[str] = set()


def register_secret(value: str | None) -> None:
    """Every later log record has `value` replaced by `***`."""
    if value and len(value) >= 6:
        _SECRETS.add(value)


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    for secret in secrets if secrets is not None else _SECRETS:
        text = text.replace(secret, "***")
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            message = record.getMessage()
            redacted = redact(message)
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = redact(record.exc_text)
            if redacted != message:
                record.msg, record.args = redacted, None
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    noisy_loggers = (
        "httpx",
        "httpcore",
        "aiosqlite",
        "asyncio",
        "discord.gateway",
        "apscheduler.executors",
        "apscheduler.scheduler",  # "Added job ..." per job at every start; bot.launch lists them once
        "alembic",
    )
    for noisy in noisy_loggers:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
