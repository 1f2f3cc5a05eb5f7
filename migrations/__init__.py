"""Alembic migrations of the personabot store (installed as `bot.migrations`)."""
