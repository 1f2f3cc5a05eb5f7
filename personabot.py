"""The `personabot` command: first checks that personabot's top-level packages are its own, then runs it.

personabot installs its folders `bot`, `adapters`, `personas` and `trainer` as top-level packages, as
the design lays them out. Those names are generic: another package of the same name earlier on
`sys.path` (a folder in the working directory or on PYTHONPATH, another distribution) would be imported
instead, and fail far from the cause. This module has the distribution's own name, so it is found even
then, and says in one line which path shadows which package.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

PACKAGES = ("bot", "adapters", "personas", "trainer")


def shadowed_package() -> str | None:
    """Why personabot's packages are not all its own (one line), or None when they are."""
    home = Path(__file__).resolve().parent
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec is not None else None
        if origin is None:
            return f"personabot is installed incompletely: its package {name!r} is missing; reinstall it"
        where = Path(origin).resolve().parent
        if where.parent != home:
            return (
                f"the package {name!r} is imported from {where}, not from personabot's install in {home}: "
                f"another package named {name!r} shadows it (remove it from the working directory or "
                "PYTHONPATH, or run personabot in its own virtual environment)"
            )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    problem = shadowed_package()
    if problem is not None:
        print(f"personabot: error: {problem}", file=sys.stderr)
        return 2
    from bot.cli import main as cli

    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
