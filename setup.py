"""Package discovery; everything else is in pyproject.toml.

The top-level `migrations/` folder (Alembic) ships inside the `bot` package as `bot.migrations`, so an
installed personabot can migrate its database without the source tree.
"""

from setuptools import find_packages, setup

packages = find_packages(
    include=["bot", "bot.*", "adapters", "adapters.*", "personas", "personas.*", "trainer", "trainer.*"]
)
packages += ["bot.migrations", "bot.migrations.versions"]
# `personabot.py`: the command's entry point, under the distribution's own name (see its docstring).
setup(packages=packages, package_dir={"bot.migrations": "migrations"}, py_modules=["personabot"])
