"""The scheduler's own error."""

from __future__ import annotations

from bot.errors import PersonabotError


class ScheduleError(PersonabotError):
    """A scheduled job cannot do its work as configured; the message says what to change."""
