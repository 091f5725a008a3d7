"""``credentials``: tenants' named endpoint API keys, encrypted at rest.

One row per (tenant, name); ``ciphertext`` is a Fernet token made with the farm's
``REV_CREDENTIAL_KEY`` (rev_tasks/credentials.py, docs/security.md "Credentials").

Revision ID: 0010_credentials
Revises: 0009_identify
Create Date: 2026-12-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_credentials"
down_revision: str | None = "0009_identify"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "credentials",
        sa.Column("tenant", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("credentials")
