"""Errors a user can act on.

Every error raised for bad input is a :class:`PersonabotError` whose message is one line naming the
file, line or field at fault. The CLI prints it without a traceback and exits non-zero.
"""

from __future__ import annotations


class PersonabotError(Exception):
    """A problem the user can fix; its message is shown as is, on one line."""

    exit_code: int = 2

    def __str__(self) -> str:
        return " ".join(super().__str__().split("\n"))


class ConfigError(PersonabotError):
    """The configuration file or environment is unreadable or invalid."""


class ModelError(PersonabotError):
    """The base model is missing, incomplete or corrupt."""


class PersonaError(PersonabotError):
    """A persona is unknown or its files are invalid."""


class StoreError(PersonabotError):
    """The conversation store cannot be opened or used as configured."""
