"""SQLAlchemy models of the conversation store.

Every hop of a message is a row: the user's message, the reply job it triggers, the assistant's reply
and the outbox row that delivers it. Alembic migrations in `migrations/` create exactly this schema (a
test runs autogenerate against a migrated database and expects no difference).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations are the same on SQLite and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite's INTEGER PRIMARY KEY is its rowid; BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use timezone-aware UTC")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JobStatus(StrEnum):
    PENDING = "pending"  # waiting to be claimed (from `available_at`)
    RUNNING = "running"  # leased by a worker
    DONE = "done"
    FAILED = "failed"


class OutboxStatus(StrEnum):
    PENDING = "pending"  # waiting to be claimed (from `available_at`)
    SENDING = "sending"  # leased by a delivering process
    DELIVERED = "delivered"
    FAILED = "failed"  # refused for good, or still failing at its deadline
    # A send may have reached the platform but its answer never came back (Telegram has no idempotency
    # key): not resent blindly; `personabot outbox retry` resends it once an operator has checked.
    UNKNOWN = "unknown"


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Channel(Base):
    """A conversation: a platform channel, DM, thread or forum topic."""

    __tablename__ = "channels"
    __table_args__ = (UniqueConstraint("platform", "external_id", "thread_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(128))
    thread_id: Mapped[str] = mapped_column(String(128), default="")
    kind: Mapped[str] = mapped_column(String(16))  # direct | group
    title: Mapped[str] = mapped_column(String(256), default="")
    # `/reset`: prompts only see messages with a larger id; history itself is kept.
    context_floor_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    # When the newest user message was sent (moved forward by ingest; a reply does not touch it).
    last_message_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class User(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "external_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    external_id: Mapped[str] = mapped_column(String(128))
    display_name: Mapped[str] = mapped_column(String(256), default="")
    is_bot: Mapped[bool] = mapped_column(Boolean, default=False)
    # `/optin` / `/optout`: may this user's conversations be exported for retraining?
    training_opt_in: Mapped[bool] = mapped_column(Boolean, default=False)
    opt_in_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # A redelivered platform event is stored once (NULL ids, e.g. undelivered replies, never clash).
        UniqueConstraint("channel_id", "platform_message_id"),
        Index("ix_messages_channel_id_id", "channel_id", "id"),
        Index("ix_messages_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), nullable=True)
    role: Mapped[str] = mapped_column(String(16))  # user | assistant | system
    persona: Mapped[str | None] = mapped_column(String(64), nullable=True)
    text: Mapped[str] = mapped_column(Text)
    platform_message_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reply_to: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    edited_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # A reply the loop guard cut, or that drifted out of the question's language: stored and delivered,
    # but left out of later prompts so it cannot pull the next replies the same way.
    excluded_from_prompts: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class ReplyJob(Base):
    """A request for one persona to post one reply in one channel; claimed by workers with a lease."""

    __tablename__ = "reply_jobs"
    __table_args__ = (Index("ix_reply_jobs_status_available_at", "status", "available_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    # Makes enqueueing idempotent: `msg:<message id>:<persona>` or `cron:<job>:<occurrence>`.
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    trigger_message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), nullable=True
    )
    persona: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="reply")  # reply | scheduled
    # Extra instruction for scheduled posts ("Greet the channel good morning"), or an API client's
    # `system` messages (appended as the user's instruction, never as the persona's system prompt).
    prompt: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Sampling an API request asked for (`bot.generation.options`): temperature, top_p, max_tokens,
    # stop, seed; None: the persona's own settings.
    options: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    reply_message_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"), nullable=True
    )
    # The platform message showing this reply while it streamed; the final delivery edits it (kept in
    # the store so a restart in between never posts the reply as a second message).
    streamed_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class OutboxDelivery(Base):
    """An assistant message waiting to be posted (or posted) on its platform."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_platform_status_available_at", "platform", "status", "available_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), unique=True)
    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"))
    platform: Mapped[str] = mapped_column(String(32))
    reply_to: Mapped[str | None] = mapped_column(String(128), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # Platform ids of the chunks posted so far, so a retried delivery never posts a chunk twice.
    delivered_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The platform's refusal, "<status>/<platform code>" (e.g. "403/50007"), when it refused for good.
    error_code: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The chunk whose send was started and not yet answered: after a crash, the send may or may not have
    # been posted, and a platform without idempotency keys (Telegram) must not send it blindly again.
    inflight_chunk: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Transient failures are retried until then (unset: `delivery.deadline_hours` after `created_at`).
    retry_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ReplyStream(Base):
    """A reply being generated, as a worker in another process tells the bot process that serves its
    platform: the text so far, for the typing indicator and streamed edits there."""

    __tablename__ = "reply_streams"
    __table_args__ = (Index("ix_reply_streams_platform_follower", "platform", "follower"),)

    job_id: Mapped[int] = mapped_column(ForeignKey("reply_jobs.id", ondelete="CASCADE"), primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="running")  # running | done | failed
    text: Mapped[str] = mapped_column(Text, default="")
    # The bot process that shows it (one, so two frontends of a platform never both post a preview).
    follower: Mapped[str | None] = mapped_column(String(128), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class AdapterVersion(Base):
    """A trained LoRA adapter of a persona; at most one per persona is active."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("persona", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    persona: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    base_model_sha256: Mapped[str] = mapped_column(String(64), default="")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    is_active: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class ChannelPersona(Base):
    """A persona bound to a channel with `/persona`; several may share a channel."""

    __tablename__ = "channel_personas"

    channel_id: Mapped[int] = mapped_column(ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True)
    persona: Mapped[str] = mapped_column(String(64), primary_key=True)
    bound_by: Mapped[str | None] = mapped_column(String(160), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class ScheduledRun(Base):
    """One occurrence of a scheduled job; the unique key makes each occurrence run once."""

    __tablename__ = "scheduled_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    run_key: Mapped[str] = mapped_column(String(255), unique=True)
    job_id: Mapped[str] = mapped_column(String(191), index=True)
    scheduled_for: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16), default="running")  # running|ok|error
    owner: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Heartbeat(Base):
    """A running component (adapter, worker, scheduler) says it is alive; `personabot status` reads it."""

    __tablename__ = "heartbeats"

    component: Mapped[str] = mapped_column(String(191), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class Erasure(Base):
    """A `/forget` request, kept so exports written before it can be scrubbed too."""

    __tablename__ = "erasures"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    user_external_id: Mapped[str] = mapped_column(String(128))
    channel_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)


class ApiKeyRecord(Base):
    """An API key of `personabot serve`: only the sha256 of its secret is kept, never the secret."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # The visible start of the secret ("pb-1a2b"), so an operator can tell keys apart in `apikey list`.
    prefix: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    rate_per_minute: Mapped[int] = mapped_column(Integer, default=60)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


def table_of(model: type[Base]) -> Table:
    """A model's Core table, for statements built once on hot paths (no ORM bookkeeping)."""
    return cast(Table, model.__table__)
