"""``jobs.heartbeat_at`` and ``jobs.resumes``: the watchdog's view of a running job.

A running job's worker writes ``heartbeat_at`` every ``REV_HEARTBEAT_SECONDS`` (and with
each batch's progress); the watchdog resumes a job whose heartbeat went silent, or whose
queued message is no longer in the broker, and counts each resume in ``resumes`` so that a
job that keeps losing its work fails with ``lost`` after ``REV_WATCHDOG_MAX_RESUMES``.

Revision ID: 0007_watchdog
Revises: 0006_challenge_nonce
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_watchdog"
down_revision: str | None = "0006_challenge_nonce"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("resumes", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resumes")
        batch.drop_column("heartbeat_at")
