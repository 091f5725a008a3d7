"""``endpoint_fingerprints``: registered models carry the reference data of endpoint jobs.

An endpoint job against a registered model reads the model's endpoint fingerprint (top-K
next-token log-probabilities of the farm key's challenges, rev_tasks/endpoints/fingerprint.py)
instead of running the weights at job time. One row per model, asked for at registration.

Revision ID: 0011_endpoint_jobs
Revises: 0010_credentials
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_endpoint_jobs"
down_revision: str | None = "0010_credentials"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "endpoint_fingerprints",
        sa.Column(
            "model_id",
            sa.String(128),
            sa.ForeignKey("models.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("n_challenges", sa.Integer(), nullable=True),
        sa.Column("doc", sa.LargeBinary(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("endpoint_fingerprints")
