"""Packaging: every third-party import is a declared requirement, the extras hold what the design says,
and personabot's generic top-level package names cannot be silently shadowed."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest

from bot.extras import EXTRA_OF, INCLUDES

ROOT = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"bot", "adapters", "personas", "trainer", "migrations", "personabot"}
SOURCES = ["bot", "adapters", "personas", "trainer", "migrations", "personabot.py"]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def declared() -> dict[str, set[str]]:
    """`{distribution: {"base"} | extras}` from personabot's installed metadata (pyproject.toml)."""
    found: dict[str, set[str]] = {}
    for req in requires("personabot") or []:
        extra = re.search(r'extra == "([^"]+)"', req)
        found.setdefault(_name(req), set()).add(extra.group(1) if extra else "base")
    return found


def imported_modules() -> dict[str, str]:
    """Top-level names first-party code imports (also inside functions), each with one place it does."""
    found: dict[str, str] = {}
    files = [p for s in SOURCES for p in ((ROOT / s).rglob("*.py") if (ROOT / s).is_dir() else [ROOT / s])]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY and top != "__future__":
                    found.setdefault(top, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_every_third_party_import_is_a_declared_requirement() -> None:
    providers = packages_distributions()
    requirements = declared()
    undeclared = []
    for module, where in sorted(imported_modules().items()):
        dists = {_name(d) for d in providers.get(module, [])}
        if not dists & set(requirements):
            undeclared.append(
                f"{where}: imports {module} (from {sorted(dists) or 'no installed distribution'})"
            )
    assert undeclared == []


def test_the_heavy_dependencies_are_extras_not_the_base_install() -> None:
    requirements = declared()
    base = {name for name, where in requirements.items() if "base" in where}
    assert not base & {"torch", "peft", "gguf", "accelerate", "matplotlib", "asyncpg", "psycopg"}
    extras = set().union(*requirements.values()) - {"base"}
    assert {"local", "train", "postgres", "dev"} <= extras
    # `dev` (the README's test command) installs every other extra.
    (dev,) = [r for r in requires("personabot") or [] if r.startswith("personabot[") and '"dev"' in r]
    assert all(extra in dev for extra in ("local", "train", "postgres"))
    # What `bot.extras` tells a user to install is where pyproject.toml puts it.
    providers = packages_distributions()
    for module, extra in EXTRA_OF.items():
        (dist,) = {_name(d) for d in providers[module]}
        assert requirements[dist] & {extra, *INCLUDES.get(extra, ())}, (module, extra)


@pytest.mark.parametrize("name", ["bot", "adapters"])
def test_a_package_of_the_same_name_earlier_on_the_path_is_one_clear_error(tmp_path: Path, name: str) -> None:
    fake = tmp_path / "elsewhere" / name
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    command = Path(sys.executable).parent / "personabot"  # the installed console script
    env = {"PYTHONPATH": str(fake.parent), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([command, "--version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"the package {name!r} is imported from {fake}, not from personabot's install" in done.stderr
    # Without it, the same command runs.
    env.pop("PYTHONPATH")
    done = subprocess.run([command, "--version"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("personabot "), done.stderr
