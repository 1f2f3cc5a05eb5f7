"""Finding personas and looking them up by slug.

Personas come from three places, in this order:

1. builtin: `personas/<slug>/persona.toml` beside this file;
2. the user's personas folder (`personas_dir` in config; default `<data_dir>/personas`);
3. installed packages, through the entry-point group `personabot.personas`. An entry point names an
   object that is, or is a zero-argument callable returning, a folder path, a `Persona`, a
   `PersonaSpec` (its dialogue paths relative to the defining module's folder), or a list of those.

Two personas with one slug is an error naming both sources. Loading is all or nothing: a registry is
built only when every persona validates, and `reload()` keeps the old personas when the new ones fail.
"""

from __future__ import annotations

import importlib.metadata
import logging
import random
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot.errors import PersonaError
from personas.macros import TRAINING_CLOCK, MacroContext, expand
from personas.spec import PersonaSpec, display_path, load_spec, validate_spec

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.prompting.lorebook import Lorebook

log = logging.getLogger(__name__)

BUILTIN_DIR = Path(__file__).resolve().parent
ENTRY_POINT_GROUP = "personabot.personas"


@dataclass(frozen=True)
class Persona:
    """A validated persona and where it came from."""

    spec: PersonaSpec
    folder: Path
    source: str  # "builtin", "user:<dir>", "entry-point:<dist> <version>"
    # Hook functions for personas defined in code (an object or module with `before_prompt` /
    # `after_generation`); folder personas put them in `plugin.py` instead.
    hooks: Any = field(default=None, compare=False)

    @property
    def slug(self) -> str:
        return self.spec.slug

    def dialogue_paths(self) -> list[Path]:
        return [self.folder / rel for rel in self.spec.dialogues]

    @property
    def plugin_path(self) -> Path | None:
        path = self.folder / "plugin.py"
        return path if path.is_file() else None

    # -- the persona's text, macros expanded the same way everywhere (see personas.macros)

    def macros(self, now: datetime = TRAINING_CLOCK, idle: timedelta | None = None) -> MacroContext:
        spec = self.spec
        return MacroContext(spec.nickname or spec.name, spec.user_name, spec.slug, now, idle)

    def system_prompt(self, now: datetime = TRAINING_CLOCK, idle: timedelta | None = None) -> str | None:
        """The system prompt as the model sees it (None when there is none). Training passes no clock,
        so `{{time}}` / `{{date}}` read the fixed `TRAINING_CLOCK` there."""
        return expand(self.spec.raw_system_prompt(), self.macros(now, idle), "system_prompt") or None

    def greetings(self, now: datetime = TRAINING_CLOCK) -> list[str]:
        """The greeting, then the alternate greetings, expanded; empty ones left out."""
        spec = self.spec
        raw = [spec.greeting, *spec.alternate_greetings]
        texts = [expand(g, self.macros(now), f"greeting.{i}").strip() for i, g in enumerate(raw)]
        return [t for t in texts if t]

    def greeting(self, rng: random.Random | None = None, now: datetime = TRAINING_CLOCK) -> str:
        """The greeting to open a chat with: the first, or any one when `greeting_choice = "random"`."""
        options = self.greetings(now)
        if not options:
            return ""
        if self.spec.greeting_choice == "random":
            return (rng or random.Random()).choice(options)
        return options[0]

    @cached_property
    def lorebook(self) -> Lorebook | None:
        """All the persona's `lorebooks` files as one lorebook, macros expanded; None without any."""
        from personas.worldinfo import merge, read_lorebook

        ctx = self.macros()

        def expander(index: int) -> Callable[[str], str]:
            return lambda text: expand(text, ctx, f"lore.{index}")

        books = [
            read_lorebook(self.folder / rel, self.spec.lore, expander(i))
            for i, rel in enumerate(self.spec.lorebooks)
        ]
        return merge(books, self.spec.lore)


def _folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    # Hidden folders are skipped: `.import-*` staging folders of an interrupted card import among them.
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / "persona.toml").is_file())


def load_folder(folder: Path, source: str) -> Persona:
    """One persona folder; a `PersonaError` naming `persona.toml` and the field when it is invalid."""
    persona = Persona(load_spec(folder / "persona.toml"), folder, source)
    _ = persona.lorebook  # a broken lorebook file is an error now, not at reply time
    return persona


def user_personas_dir(settings: Settings) -> Path:
    """The user's personas folder: `personas_dir`, else `<data_dir>/personas` (where import-card writes)."""
    return (settings.personas_dir or settings.data_dir / "personas").expanduser()


def _entry_point_source(ep: importlib.metadata.EntryPoint) -> str:
    dist = ep.dist
    name = f"{dist.name} {dist.version}" if dist is not None else ep.value
    return f"entry-point:{name} ({ep.name} = {ep.value})"


def _from_object(obj: Any, source: str, module_dir: Path) -> list[Persona]:
    """Whatever an entry point yields, as personas."""
    if callable(obj) and not isinstance(obj, type):
        try:
            obj = obj()
        except Exception as exc:
            raise PersonaError(f"{source}: failed: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, list | tuple):
        return [p for item in obj for p in _from_object(item, source, module_dir)]
    if isinstance(obj, Persona):
        return [Persona(obj.spec, obj.folder, source, obj.hooks)]
    if isinstance(obj, dict):
        return [Persona(validate_spec(obj, source, folder=module_dir), module_dir, source)]
    if isinstance(obj, PersonaSpec):
        for index, path in enumerate(obj.dialogues):
            if not (module_dir / path).is_file():
                raise PersonaError(f"{source}: dialogues.{index}: file not found: {module_dir / path}")
        return [Persona(obj, module_dir, source)]
    if isinstance(obj, str | Path):
        folder = Path(obj)
        if not (folder / "persona.toml").is_file():
            raise PersonaError(f"{source}: {folder} has no persona.toml")
        return [load_folder(folder, source)]
    raise PersonaError(
        f"{source}: yields {type(obj).__name__}; expected a folder path, a Persona, a PersonaSpec, "
        "a dict or a list of them"
    )


def entry_point_personas(group: str = ENTRY_POINT_GROUP) -> list[Persona]:
    """Personas installed packages register under the entry-point group `personabot.personas`."""
    found: list[Persona] = []
    for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: (e.name, e.value)):
        source = _entry_point_source(ep)
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party package is the user's to fix, with a clear line
            raise PersonaError(f"{source}: cannot load: {type(exc).__name__}: {exc}") from None
        module = sys.modules.get(ep.module)
        module_file = getattr(module, "__file__", None)
        module_dir = Path(module_file).resolve().parent if module_file else Path.cwd()
        found += _from_object(obj, source, module_dir)
    return found


def scan(
    user_dir: Path | None = None, *, entry_points: bool = True, builtin: bool = True
) -> tuple[list[Persona], list[str]]:
    """Every persona that loads, and one message per problem (bad persona or duplicate slug)."""
    personas: list[Persona] = []
    problems: list[str] = []

    def attempt(load: Any, *args: Any) -> None:
        try:
            result = load(*args)
        except PersonaError as exc:
            problems.append(str(exc))
            return
        personas.extend(result if isinstance(result, list) else [result])

    if builtin:
        for folder in _folders(BUILTIN_DIR):
            attempt(load_folder, folder, "builtin")
    if user_dir is not None:
        for folder in _folders(user_dir):
            attempt(load_folder, folder, f"user:{display_path(user_dir)}")
    if entry_points:
        attempt(entry_point_personas)
    seen: dict[str, Persona] = {}
    unique: list[Persona] = []
    for persona in personas:
        other = seen.get(persona.slug)
        if other is not None:
            problems.append(_duplicate(other, persona))
            continue
        seen[persona.slug] = persona
        unique.append(persona)
    return unique, problems


def _describe(persona: Persona) -> str:
    return f"{persona.source} ({display_path(persona.folder)})"


def _duplicate(first: Persona, second: Persona) -> str:
    return f"persona {first.slug!r} is defined twice: {_describe(first)} and {_describe(second)}"


class PersonaRegistry:
    """All personas personabot knows, by slug."""

    def __init__(self, personas: Iterable[Persona]) -> None:
        self._by_slug = self._index(personas)
        self._discovery: dict[str, Any] | None = None

    @staticmethod
    def _index(personas: Iterable[Persona]) -> dict[str, Persona]:
        by_slug: dict[str, Persona] = {}
        for persona in personas:
            other = by_slug.get(persona.slug)
            if other is not None:
                raise PersonaError(_duplicate(other, persona))
            by_slug[persona.slug] = persona
        return by_slug

    @classmethod
    def discover(
        cls, user_dir: Path | None = None, *, entry_points: bool = True, builtin: bool = True
    ) -> PersonaRegistry:
        """Builtin personas, the user's personas folder, then installed packages' entry points.

        Raises the first problem as a `PersonaError`; nothing is half loaded.
        """
        personas, problems = scan(user_dir, entry_points=entry_points, builtin=builtin)
        if problems:
            raise PersonaError(problems[0])
        registry = cls(personas)
        registry._discovery = {"user_dir": user_dir, "entry_points": entry_points, "builtin": builtin}
        return registry

    @classmethod
    def from_settings(cls, settings: Settings) -> PersonaRegistry:
        return cls.discover(user_personas_dir(settings))

    def reload(self) -> None:
        """Discover again; on any error the registry keeps the personas it had and the error is raised."""
        if self._discovery is None:
            raise PersonaError("this registry was not discovered from folders; nothing to reload")
        fresh = type(self).discover(**self._discovery)
        self._by_slug = fresh._by_slug

    def get(self, slug: str) -> Persona:
        try:
            return self._by_slug[slug]
        except KeyError:
            known = ", ".join(sorted(self._by_slug)) or "none"
            raise PersonaError(f"unknown persona {slug!r}; available: {known}") from None

    def __contains__(self, slug: object) -> bool:
        return slug in self._by_slug

    def __len__(self) -> int:
        return len(self._by_slug)

    def all(self) -> list[Persona]:
        return [self._by_slug[s] for s in sorted(self._by_slug)]
