"""``models.dtype`` and ``votes.executed_on``: the compute dtype of jobs and fingerprints.

A registered model's fingerprint is computed in the dtype it was registered with (float32,
float16 or bfloat16); jobs against it must run their candidate in the same one, and its
pool top-ups are computed in it too. A job's own dtype is in its request JSON. Each vote
records where its validator re-executed the sampled records (worker, device, dtype).

Revision ID: 0008_dtype
Revises: 0007_watchdog
Create Date: 2026-12-01 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_dtype"
down_revision: str | None = "0007_watchdog"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.add_column(
            sa.Column("dtype", sa.String(16), nullable=False, server_default="float32")
        )
    with op.batch_alter_table("votes") as batch:
        batch.add_column(sa.Column("executed_on", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("votes") as batch:
        batch.drop_column("executed_on")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("dtype")
