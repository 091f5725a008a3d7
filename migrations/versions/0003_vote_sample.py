"""``votes.reexecuted``: the record positions each validator re-executed.

Validators now draw the records they re-execute from the operating system's randomness
after the transcript is stored, instead of from a public seed (``"<job id>:<validator>"``)
that an inference worker could compute in advance. The draw is recorded with the vote so
that the check stays auditable. Votes cast before this revision have ``NULL`` here.

Revision ID: 0003_vote_sample
Revises: 0002_auth_tenants
Create Date: 2026-11-27 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_vote_sample"
down_revision: str | None = "0002_auth_tenants"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("votes", sa.Column("reexecuted", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("votes") as batch:
        batch.drop_column("reexecuted")
