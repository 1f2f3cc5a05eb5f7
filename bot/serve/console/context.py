"""What the console needs from the serving process, as Protocols so it imports nothing above it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from bot.config import Settings
from bot.store import Store
from personas.registry import PersonaRegistry
from personas.versions import BaseModelFacts, base_model_facts


class ConsoleKey(Protocol):
    """An API key as the console sees it: it only asks whether the key may change things."""

    @property
    def admin(self) -> bool: ...


# A key's secret -> the key, or None when no such (unrevoked) key exists.
Authenticate = Callable[[str], Awaitable[ConsoleKey | None]]


@dataclass
class ConsoleContext:
    store: Store
    settings: Settings
    registry: PersonaRegistry
    authenticate: Authenticate
    # The base model's fingerprint and tokenizer, which activation checks adapters against; loaded on
    # the first activation (it reads the tokenizer and hashes the weights), then kept.
    load_base: Callable[[], BaseModelFacts] | None = None
    _base: BaseModelFacts | None = field(default=None, repr=False)

    def base(self) -> BaseModelFacts:
        if self._base is None:
            self._base = (self.load_base or (lambda: base_model_facts(self.settings)))()
        return self._base
