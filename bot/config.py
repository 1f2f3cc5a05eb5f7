"""Configuration: `personabot.toml` plus `PERSONABOT_*` environment variables.

The file comes from `--config`, else `$PERSONABOT_CONFIG`, else `./personabot.toml` when it exists.
Environment variables override the file; nested keys use a double underscore
(`PERSONABOT_WORKER__MAX_BATCH=8`). Bot tokens are read from `DISCORD_TOKEN` / `TELEGRAM_TOKEN`, the
config, or a token file, and are held as `SecretStr` so they never show up in a repr, a log line or an
error message.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from bot.errors import ConfigError

DEFAULT_CONFIG_NAME = "personabot.toml"
CONFIG_ENV = "PERSONABOT_CONFIG"


class Section(BaseModel):
    """A config table: unknown keys are an error, so typos are caught."""

    model_config = ConfigDict(extra="forbid")


class ModelSettings(Section):
    path: Path | None = Field(
        default=None,
        description="A local Hugging Face model folder or a .gguf file. Unset: the pulled default model.",
    )
    name: str = Field(default="SmolLM2-135M-Instruct", description="Name recorded in adapter manifests.")
    device: Literal["auto", "cpu", "cuda"] | str = Field(default="auto", description="auto, cpu or cuda[:N].")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    weights: Literal["auto", "float16", "int8", "int4"] = Field(
        default="auto",
        description="CPU serving: the base model's linear weights as float16, int8 or int4 (LoRAs stay float32); "
        "auto: in model.dtype.",
    )
    compile: bool = Field(
        default=False,
        description="CPU float32 (model.weights auto or int8): batch-1 decode as one torch.compile'd step (faster decoding for one user "
        "at a time; tens of seconds of compiling at start; needs a C++ compiler).",
    )
    auto_pull: bool = Field(default=True, description="Pull the default model on first use when missing.")


class AccessSettings(Section):
    """Who may talk to the bot and who may run admin commands, on every platform alike.

    Identities are written `platform:id` (`discord:1234`, `telegram:42`); roles `discord:role:ID`;
    channels `platform:channel_id`.
    """

    admins: list[str] = Field(default_factory=list)
    allowed_users: list[str] = Field(default_factory=list, description="Empty: everyone not blocked.")
    blocked_users: list[str] = Field(default_factory=list)
    allowed_roles: list[str] = Field(default_factory=list)
    blocked_roles: list[str] = Field(default_factory=list)
    allowed_channels: list[str] = Field(default_factory=list)
    blocked_channels: list[str] = Field(default_factory=list)
    ignore_bots: bool = True
    user_cooldown_per_minute: float = Field(default=20.0, ge=0, description="0 turns the cooldown off.")
    channel_cooldown_per_minute: float = Field(default=60.0, ge=0)


class TokenSettings(Section):
    token: SecretStr | None = None
    token_file: Path | None = None

    def resolve_token(self, env_var: str) -> SecretStr | None:
        """The token from the environment, the config, or the token file, in that order."""
        if os.environ.get(env_var):
            return SecretStr(os.environ[env_var].strip())
        if self.token is not None and self.token.get_secret_value():
            return self.token
        if self.token_file is not None:
            try:
                return SecretStr(self.token_file.read_text(encoding="utf-8").strip())
            except OSError as exc:
                raise ConfigError(f"cannot read token file {self.token_file}: {exc.strerror}") from None
        return None


class DiscordSettings(TokenSettings):
    command_prefix: str = "!"
    sharded: bool = False
    shard_count: int | None = None
    streaming: bool = False
    ready_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How long start-up waits for the gateway to be ready (per shard when sharded).",
    )
    api_base: str | None = Field(
        default=None, description="REST API base URL (a proxy, or a test server); unset: Discord's."
    )
    gateway_url: str | None = Field(default=None, description="Gateway URL to use instead of Discord's.")


# The only ports Telegram delivers webhooks to (https://core.telegram.org/bots/api#setwebhook).
TELEGRAM_WEBHOOK_PORTS = (443, 80, 88, 8443)


def webhook_url_problem(url: str) -> str | None:
    """Why Telegram would not deliver to `url`, or None when it would."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        return "must be a public https:// URL (Telegram sends webhooks over HTTPS only)"
    try:
        port = parts.port or 443
    except ValueError:
        return "has an invalid port"
    if port not in TELEGRAM_WEBHOOK_PORTS:
        return f"port {port} is not one Telegram sends webhooks to; use 443, 80, 88 or 8443"
    return None


class TelegramSettings(TokenSettings):
    mode: Literal["polling", "webhook"] = "polling"
    webhook_url: str | None = None
    webhook_listen: str = "0.0.0.0"
    webhook_port: int = 8443
    webhook_secret: SecretStr | None = None
    streaming: bool = False
    base_url: str | None = Field(default=None, description="Bot API base URL (a local Bot API server).")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, url: str | None) -> str | None:
        if url is not None and (problem := webhook_url_problem(url)) is not None:
            raise ValueError(problem)
        return url


class WorkerSettings(Section):
    enabled: bool = Field(default=True, description="Run the worker inside `personabot run`.")
    max_batch: int = Field(default=16, ge=1)
    lease_seconds: float = Field(
        default=6.0,
        gt=0,
        description="A claimed job's lease, renewed every third of it while the job runs: a worker "
        "that dies loses its jobs to another worker within this time.",
    )
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_seconds: float = Field(default=5.0, ge=0)
    poll_seconds: float = Field(
        default=2.0,
        gt=0,
        description="A new job wakes the worker at once (in this process, or through PostgreSQL's "
        "NOTIFY); this slow poll is the safety net, e.g. for retries that fall due.",
    )
    kv_cache_bytes: int = Field(default=512 * 1024 * 1024, ge=0)
    language_retries: int = Field(
        default=2,
        ge=0,
        description="A reply to an English message that comes out in another language is generated "
        "again, sampled with fixed seeds, up to this many times; the first English one is kept.",
    )
    metrics_port: int | None = None


class VllmSettings(Section):
    """`generation.backend = "vllm"`: the vLLM servers the worker sends rendered prompts to."""

    urls: list[str] = Field(
        default_factory=lambda: ["http://127.0.0.1:8000"],
        description="Base URLs of vLLM OpenAI-compatible servers (replicas); requests go to the least loaded healthy one.",
    )
    api_key: SecretStr | None = Field(
        default=None, description="Sent as a bearer token (vLLM's --api-key); else $VLLM_API_KEY."
    )
    model: str | None = Field(
        default=None, description="The served base model name; unset: the first model the server lists."
    )
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    request_timeout_seconds: float = Field(
        default=600.0, gt=0, description="A reply that takes longer fails its attempt (retried with backoff)."
    )
    stall_timeout_seconds: float = Field(
        default=120.0, gt=0, description="No token (or first token) for this long fails the attempt."
    )
    health_check_seconds: float = Field(
        default=2.0, gt=0, description="How often an unhealthy server is probed (GET /health)."
    )
    adapter_paths: dict[str, str] = Field(
        default_factory=dict,
        description="Adapter folder prefixes as this machine sees them -> as the vLLM server sees them.",
    )


class GenerationSettings(Section):
    backend: Literal["local", "vllm"] = Field(
        default="local", description="local: the model in the worker process; vllm: vLLM servers."
    )
    vllm: VllmSettings = Field(default_factory=VllmSettings)


class ScheduledPostSettings(Section):
    """A scheduled post written in personabot.toml (`[[scheduler.posts]]`) rather than in persona.toml.

    `cron` and `persona` are checked when the scheduler starts, not here: one bad entry is reported in
    the log and in `personabot status`, and the other jobs keep running.
    """

    persona: str = Field(description="Slug of the persona that writes the post.")
    cron: str = Field(description="Five-field crontab expression, e.g. '0 9 * * *'.")
    prompt: str = Field(description="What the persona is asked to write.")
    timezone: str = Field(default="UTC", description="Time zone the cron expression is read in.")
    channels: list[str] = Field(
        default_factory=list, description="`platform:id` channels; empty: the channels bound to the persona."
    )


class SchedulerSettings(Section):
    enabled: bool = Field(default=True, description="Run the scheduler inside `personabot run`.")
    misfire_grace_seconds: float = Field(
        default=900.0,
        gt=0,
        description="An occurrence missed while no process ran is still run this late; older ones are skipped.",
    )
    retention_days: float | None = Field(
        default=None, gt=0, description="Prune messages older than this many days (unset: keep them)."
    )
    run_history_days: float = Field(
        default=30.0,
        gt=0,
        description="Records of finished scheduled runs (`scheduled_runs`) older than this many days are "
        "deleted; each job's newest is kept.",
    )
    retention_channels: dict[str, float] = Field(
        default_factory=dict,
        description="Per-channel retention in days, keyed `platform:id` (or `platform:id/thread`); "
        "overrides retention_days for that channel.",
    )
    retention_check_minutes: float = Field(default=60.0, gt=0, description="How often retention runs.")
    retrain: bool = Field(default=True, description="Retrain personas on opted-in conversations.")
    retrain_min_conversations: int = Field(
        default=50, ge=1, description="New opted-in conversations a persona needs before it is retrained."
    )
    retrain_check_hours: float = Field(default=24.0, gt=0, description="How often retraining is checked.")
    retrain_command: list[str] | None = Field(
        default=None,
        description="Training command with {persona}, {data}, {version} and {python} placeholders; "
        "unset: `{python} -m bot.scheduler.train_job {persona} --data {data} --version {version}` "
        "(`personabot train` on the bundled dialogues plus the export).",
    )
    retrain_eval_tolerance: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Largest drop in `personabot eval` accuracy or style a retrained version may show "
        "and still be activated (it may never loop more).",
    )
    retrain_timeout_hours: float = Field(
        default=6.0, gt=0, description="A training run is stopped after this."
    )
    conversation_gap_minutes: float = Field(
        default=30.0, gt=0, description="Silence that splits a channel's history into separate conversations."
    )
    posts: list[ScheduledPostSettings] = Field(
        default_factory=list, description="Scheduled posts besides those in each persona.toml."
    )


class RunSettings(Section):
    """`personabot run`: liveness and shutdown."""

    heartbeat_seconds: float = Field(
        default=15.0, gt=0, description="How often each component writes its heartbeat row."
    )
    stop_timeout_seconds: float = Field(
        default=30.0, gt=0, description="On SIGTERM, how long in-flight reply jobs get to finish."
    )
    flush_timeout_seconds: float = Field(
        default=10.0, gt=0, description="On SIGTERM, how long the outbox gets to deliver what is pending."
    )
    reconnect_attempts: int = Field(
        default=5,
        ge=1,
        description="A platform connection that ends unexpectedly is restored this many times at most "
        "(with backoff); then `personabot run` exits non-zero so its supervisor restarts it.",
    )
    spool_max_events: int = Field(
        default=10_000,
        ge=1,
        description="Incoming events kept (in memory and in <data_dir>/spool/) while the database is "
        "unreachable; past this, Telegram updates stay unconfirmed and Discord messages are lost.",
    )
    reconnect_backoff_seconds: float = Field(
        default=2.0, gt=0, description="Wait before the first reconnect; doubled each attempt (max 60 s)."
    )


class DeliverySettings(Section):
    """The outbox: posting replies on the platforms."""

    deadline_hours: float = Field(
        default=24.0,
        gt=0,
        description="A reply that keeps failing for a transient reason (5xx, timeouts, the platform "
        "unreachable) is retried this long after it was written, then marked failed.",
    )
    retry_backoff_seconds: float = Field(
        default=2.0, ge=0, description="First retry delay of a failed delivery; doubles each attempt."
    )
    retry_max_seconds: float = Field(
        default=60.0, gt=0, description="Longest wait between two delivery attempts."
    )
    lease_seconds: float = Field(
        default=30.0, gt=0, description="Lease of a claimed reply, renewed while it is being posted."
    )


class ServeSettings(Section):
    """`personabot serve`: the OpenAI-compatible API."""

    host: str = Field(default="127.0.0.1", description="Address to listen on (`--host`).")
    port: int = Field(default=8080, ge=0, le=65535, description="Port to listen on (`--port`).")
    worker: bool = Field(
        default=True,
        description="Run a worker inside `personabot serve`; false: separate `personabot worker` processes "
        "answer the API's requests.",
    )
    max_request_chars: int = Field(
        default=32_000, ge=1, description="Most characters in one request's messages (more: 400)."
    )
    max_messages: int = Field(default=256, ge=1, description="Most messages in one request (more: 400).")
    reply_timeout_seconds: float = Field(
        default=300.0, gt=0, description="How long a request waits for its reply before a 504."
    )


class Settings(BaseSettings):
    """Everything personabot reads from its config file and environment."""

    model_config = SettingsConfigDict(
        env_prefix="PERSONABOT_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(default=Path(".personabot"), description="SQLite file, model, trained LoRAs.")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/personabot.db"
    )
    default_persona: str = "assistant"
    personas_dir: Path | None = Field(
        default=None, description="A folder of your own personas; unset: <data_dir>/personas."
    )
    log_level: str = "INFO"
    model: ModelSettings = Field(default_factory=ModelSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)
    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    telegram: TelegramSettings = Field(default_factory=TelegramSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)

    # Where the values came from, for messages; not a setting.
    config_path: Path | None = Field(default=None, exclude=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment first, then the TOML file (passed as init kwargs by load_settings).
        return env_settings, init_settings

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'personabot.db').resolve()}"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def loras_dir(self) -> Path:
        return self.data_dir / "loras"


def find_config_path(explicit: str | os.PathLike[str] | None) -> Path | None:
    """The config file to read: `--config`, then `$PERSONABOT_CONFIG`, then `./personabot.toml`."""
    if explicit:
        return Path(explicit)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.exists() else None


def load_settings(config: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read and validate the configuration; any problem is one `ConfigError` naming file and key."""
    path = find_config_path(config)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    data.update(overrides)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, str(path) if path else "environment")) from None
    settings.config_path = path
    return settings


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, `source: dotted.key: message`; input values are left out (secrets)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{source}: {key}: {err['msg']}")
    return "; ".join(parts)
