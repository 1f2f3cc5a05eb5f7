"""Finding personas and looking them up by slug."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bot.errors import PersonaError
from personas.spec import PersonaSpec, load_spec

BUILTIN_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Persona:
    """A validated persona and where it came from."""

    spec: PersonaSpec
    folder: Path
    source: str  # "builtin", "user:<dir>", "entry-point:<dist>"

    @property
    def slug(self) -> str:
        return self.spec.slug

    def dialogue_paths(self) -> list[Path]:
        return [self.folder / rel for rel in self.spec.dialogues]


def _folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / "persona.toml").is_file())


class PersonaRegistry:
    """All personas personabot knows, by slug."""

    def __init__(self, personas: list[Persona]) -> None:
        self._by_slug: dict[str, Persona] = {}
        for persona in personas:
            other = self._by_slug.get(persona.slug)
            if other is not None:
                raise PersonaError(
                    f"persona {persona.slug!r} is defined twice: {other.source} ({other.folder}) "
                    f"and {persona.source} ({persona.folder})"
                )
            self._by_slug[persona.slug] = persona

    @classmethod
    def discover(cls, user_dir: Path | None = None) -> PersonaRegistry:
        """Builtin personas, then the user's personas folder."""
        found = [Persona(load_spec(f / "persona.toml"), f, "builtin") for f in _folders(BUILTIN_DIR)]
        if user_dir is not None:
            found += [
                Persona(load_spec(f / "persona.toml"), f, f"user:{user_dir}") for f in _folders(user_dir)
            ]
        return cls(found)

    def get(self, slug: str) -> Persona:
        try:
            return self._by_slug[slug]
        except KeyError:
            known = ", ".join(sorted(self._by_slug)) or "none"
            raise PersonaError(f"unknown persona {slug!r}; available: {known}") from None

    def __contains__(self, slug: object) -> bool:
        return slug in self._by_slug

    def all(self) -> list[Persona]:
        return [self._by_slug[s] for s in sorted(self._by_slug)]
