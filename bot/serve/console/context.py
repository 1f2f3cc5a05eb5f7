"""What the console needs from the serving process, as Protocols so it imports nothing above it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from bot.config import Settings
from bot.store import Store
from personas.registry import PersonaRegistry
from personas.versions import BaseModelFacts, base_model_facts

if TYPE_CHECKING:
    from bot.serve.auth import KeyCheck


class ConsoleKey(Protocol):
    """An API key as the console sees it: it only asks whether the key may change things."""

    @property
    def admin(self) -> bool: ...


# A key's secret ("" when none was given) -> the key, or None when it lets nobody in.
Authenticate = Callable[[str], Awaitable[ConsoleKey | None]]


@dataclass
class ConsoleContext:
    store: Store
    settings: Settings
    registry: PersonaRegistry
    authenticate: Authenticate
    # The base model's fingerprint and tokenizer, which activation checks adapters against; loaded on
    # the first activation (it reads the tokenizer and hashes the weights), then kept.
    _base: BaseModelFacts | None = field(default=None, init=False, repr=False)

    def base(self) -> BaseModelFacts:
        if self._base is None:
            self._base = base_model_facts(self.settings)
        return self._base


def store_keys(store: Store, check: KeyCheck) -> Authenticate:
    """The API's keys (`personabot apikey`): where the API is open (loopback, no key created), so is the
    console, as the local admin; otherwise a key is needed."""
    from bot.serve import keys
    from bot.serve.auth import LOCAL_KEY

    async def authenticate(secret: str) -> ConsoleKey | None:
        if secret:
            return await keys.authenticate(store, secret)
        return LOCAL_KEY if check.may_open and not await keys.any_active(store) else None

    return authenticate
