"""Outbox delivery state: the platform's refusal code, the retry deadline, the chunk in flight

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
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.add_column(sa.Column("error_code", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("inflight_chunk", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("retry_until", bot.store.models.UTCDateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("outbox", schema=None) as batch_op:
        batch_op.drop_column("retry_until")
        batch_op.drop_column("inflight_chunk")
        batch_op.drop_column("error_code")
