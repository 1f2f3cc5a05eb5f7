"""Configuration: file + environment, errors naming the key, secrets that never show."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.config import load_settings
from bot.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "personabot.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_use_sqlite_in_the_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PERSONABOT_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.data_dir == Path(".personabot")
    assert settings.resolved_database_url == f"sqlite:///{tmp_path / '.personabot' / 'personabot.db'}"
    assert settings.default_persona == "assistant"


def test_file_then_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, 'default_persona = "pirate"\n[worker]\nmax_batch = 4\nlease_seconds = 30\n')
    monkeypatch.setenv("PERSONABOT_WORKER__MAX_BATCH", "8")
    settings = load_settings(path)
    assert settings.default_persona == "pirate"
    assert settings.worker.max_batch == 8  # the environment wins
    assert settings.worker.lease_seconds == 30


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONABOT_CONFIG", str(write(tmp_path, 'default_persona = "poet"\n')))
    assert load_settings().default_persona == "poet"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[worker]\nmax_batch = 'many'\n", "worker.max_batch"),
        ("[worker]\nmax_bacth = 3\n", "worker.max_bacth"),
        ("colour = 'blue'\n", "colour"),
        ("[worker\nmax_batch = 3\n", "invalid TOML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    message = str(err.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.toml")


def test_tokens_never_show_in_repr_or_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "MTIzNDU2.super-secret-token"
    path = write(
        tmp_path, f'[discord]\ntoken = "{secret}"\n[telegram]\ntoken = "{secret}"\nmode = "carrier-pigeon"\n'
    )
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert secret not in str(err.value) and "telegram.mode" in str(err.value)
    path = write(tmp_path, f'[discord]\ntoken = "{secret}"\n')
    settings = load_settings(path)
    assert secret not in repr(settings) and secret not in str(settings.model_dump())
    assert settings.discord.resolve_token("DISCORD_TOKEN").get_secret_value() == secret


def test_token_sources_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    settings = load_settings(write(tmp_path, f'[telegram]\ntoken_file = "{token_file}"\n'))
    assert settings.telegram.resolve_token("TELEGRAM_TOKEN").get_secret_value() == "from-file"
    monkeypatch.setenv("TELEGRAM_TOKEN", "from-env")
    assert settings.telegram.resolve_token("TELEGRAM_TOKEN").get_secret_value() == "from-env"
    settings = load_settings(write(tmp_path, f'[telegram]\ntoken_file = "{tmp_path / "missing"}"\n'))
    monkeypatch.delenv("TELEGRAM_TOKEN")
    with pytest.raises(ConfigError, match="cannot read token file"):
        settings.telegram.resolve_token("TELEGRAM_TOKEN")
