"""A bot-only install (`pip install personabot`, no extras), made from this venv in about a second.

A new virtual environment whose site-packages links to everything in this one's except the
distributions that only the `local` and `train` extras bring (torch, peft, gguf, accelerate,
matplotlib, and what only they need): for its Python those packages are simply not installed. An
import fails as it would there, `importlib.util.find_spec` says None, and their metadata is absent.
"""

from __future__ import annotations

import re
import subprocess
import sysconfig
import venv
from importlib.metadata import PackageNotFoundError, distribution, requires
from pathlib import Path

HEAVY_EXTRAS = ("local", "train")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _deps(dist_name: str) -> set[str]:
    try:
        reqs = requires(dist_name) or []
    except PackageNotFoundError:
        return set()
    return {_name(r) for r in reqs if "extra ==" not in r}


def _closure(names: set[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in seen or name == "personabot":
            continue
        seen.add(name)
        todo += _deps(name)
    return seen


def extra_only_distributions() -> set[str]:
    """Distributions the heavy extras install that the base install (and pytest's) does not."""
    reqs = requires("personabot") or []
    base = {_name(r) for r in reqs if "extra ==" not in r}
    heavy = {
        _name(r)
        for r in reqs
        if any(f'extra == "{e}"' in r for e in HEAVY_EXTRAS) and _name(r) != "personabot"
    }
    return _closure(heavy) - _closure(base)


def bot_only_python(folder: Path) -> Path:
    """The Python of a bot-only virtual environment made in `folder` (personabot installed editable)."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    python = folder / "bin" / "python"
    target = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    site = Path(sysconfig.get_paths()["purelib"])
    hidden: set[str] = set()
    for name in extra_only_distributions():
        try:
            files = distribution(name).files or []
        except PackageNotFoundError:
            continue
        hidden |= {f.parts[0] for f in files if f.parts and f.parts[0] not in ("..", "bin", "__pycache__")}
    for entry in site.iterdir():
        if entry.name not in hidden and not (target / entry.name).exists():
            (target / entry.name).symlink_to(entry)
    return python
