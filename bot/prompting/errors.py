"""The renderer's error: a template or conversation it cannot format as asked."""

from __future__ import annotations

from bot.errors import PersonabotError


class PromptError(PersonabotError):
    """An unknown template, a token missing from the vocabulary, or a conversation the template rejects."""
