"""Fresh challenges per job: a job's nonce or pool draw, and a pool's retired challenges.

``jobs.challenge_nonce`` (hex) and ``jobs.challenge_indices`` (JSON) are fixed at prepare
with the commitment; ``retired_challenges`` lists the pool challenges that stored
transcripts have shown, which no later job of that model draws; ``fingerprints
.topup_requested_at`` keeps concurrent jobs from enqueueing a pool top-up each.

Revision ID: 0006_challenge_nonce
Revises: 0005_idempotency_keys
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_challenge_nonce"
down_revision: str | None = "0005_idempotency_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("challenge_nonce", sa.String(64), nullable=True))
        batch.add_column(sa.Column("challenge_indices", sa.JSON(), nullable=True))
    with op.batch_alter_table("fingerprints") as batch:
        batch.add_column(
            sa.Column("topup_requested_at", sa.DateTime(timezone=True), nullable=True)
        )
    op.create_table(
        "retired_challenges",
        sa.Column(
            "model_id",
            sa.String(128),
            sa.ForeignKey("fingerprints.model_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("challenge_index", sa.Integer(), primary_key=True),
        sa.Column(
            "job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True
        ),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("retired_challenges")
    with op.batch_alter_table("fingerprints") as batch:
        batch.drop_column("topup_requested_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("challenge_indices")
        batch.drop_column("challenge_nonce")
