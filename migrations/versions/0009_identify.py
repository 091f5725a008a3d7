"""``jobs.waiting``: an identify job's wait for the pending fingerprints it will list.

An identify job stays queued while models registered before it still have their fingerprint
pending (at most ``REV_IDENTIFY_WAIT_SECONDS``); the wait (which models, since when, until
when) is stored here and shown under the job's ``progress``.

Revision ID: 0009_identify
Revises: 0008_dtype
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_identify"
down_revision: str | None = "0008_dtype"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("waiting", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("waiting")
