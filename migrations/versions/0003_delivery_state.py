"""Delivery state: the platform's refusal code, the retry deadline, the chunk in flight; streamed
message ids and reply streams across processes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import bot.store.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "reply_streams",
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("platform", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("follower", sa.String(length=128), nullable=True),
        sa.Column("updated_at", bot.store.models.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["reply_jobs.id"], name=op.f("fk_reply_streams_job_id_reply_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_reply_streams")),
    )
    with op.batch_alter_table("reply_streams", schema=None) as batch_op:
        batch_op.create_index("ix_reply_streams_platform_follower", ["platform", "follower"], unique=False)
    with op.batch_alter_table("reply_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("streamed_id", sa.String(length=128), nullable=True))
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error_code", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("inflight_chunk", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("retry_until", bot.store.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("reply_jobs", schema=None) as batch_op:
        batch_op.drop_column("streamed_id")
    with op.batch_alter_table("reply_streams", schema=None) as batch_op:
        batch_op.drop_index("ix_reply_streams_platform_follower")
    op.drop_table("reply_streams")
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("retry_until")
        batch_op.drop_column("inflight_chunk")
        batch_op.drop_column("error_code")
