"""Optional parts of personabot and the extra that installs each, so a missing one is one clear line.

The base install is a bot-only process (adapters, store, queue, scheduler, the vLLM client backend).
What needs more says which extra to install (`pip install 'personabot[local]'`) instead of ending in
a `ModuleNotFoundError` traceback.
"""

from __future__ import annotations

import importlib.util

from bot.errors import PersonabotError

# Top-level module -> the extra that installs it (pyproject.toml's optional-dependencies; a test keeps
# the two in step). `train` includes `local`.
EXTRA_OF = {
    "torch": "local",
    "gguf": "local",
    "peft": "local",
    "accelerate": "local",
    "matplotlib": "train",
    "asyncpg": "postgres",
}


# An extra that installs another's packages too.
INCLUDES = {"train": ("local",)}


class MissingExtra(PersonabotError):
    """A command needs an optional dependency that is not installed."""


def _message(purpose: str, module: str, extra: str) -> str:
    return (
        f"{purpose} needs the [{extra}] extra ({module} is not installed): pip install 'personabot[{extra}]'"
    )


def require(extra: str, purpose: str) -> None:
    """Raise `MissingExtra` when a module that `extra` installs is missing."""
    covered = {extra, *INCLUDES.get(extra, ())}
    for module, of in EXTRA_OF.items():
        if of in covered and importlib.util.find_spec(module) is None:
            raise MissingExtra(_message(purpose, module, extra))


def missing_extra(exc: ModuleNotFoundError, purpose: str = "this command") -> MissingExtra | None:
    """The clear error for an import that failed because an extra is not installed, else None."""
    module = (exc.name or "").partition(".")[0]
    return MissingExtra(_message(purpose, module, EXTRA_OF[module])) if module in EXTRA_OF else None
