"""API keys and tenants: the ``api_keys`` table, ``tenant`` on jobs and models.

Also ``jobs.attempts`` (inference deliveries), so that a job whose model keeps killing its
worker is failed after ``REV_MAX_ATTEMPTS`` instead of being redelivered forever.

Existing jobs and models belong to the ``default`` tenant (server default), so an upgraded
farm keeps serving them to keys of that tenant and to admin keys.

Revision ID: 0002_auth_tenants
Revises: 0001_initial
Create Date: 2025-02-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_auth_tenants"
down_revision: str | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
DEFAULT_TENANT = "default"


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("scopes", sa.String(128), nullable=False),
        sa.Column("name", sa.String(128), nullable=True),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.UniqueConstraint("token_hash", name="uq_api_keys_token_hash"),
    )
    op.create_index("ix_api_keys_tenant", "api_keys", ["tenant"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("tenant", sa.String(64), nullable=False, server_default=DEFAULT_TENANT)
        )
        batch.add_column(sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"))
        batch.create_index("ix_jobs_tenant_created_id", ["tenant", "created_at", "id"])
    with op.batch_alter_table("models") as batch:
        batch.add_column(
            sa.Column("tenant", sa.String(64), nullable=False, server_default=DEFAULT_TENANT)
        )
        batch.create_index("ix_models_tenant", ["tenant"])


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_index("ix_models_tenant")
        batch.drop_column("tenant")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_tenant_created_id")
        batch.drop_column("attempts")
        batch.drop_column("tenant")
    op.drop_index("ix_api_keys_tenant", table_name="api_keys")
    op.drop_table("api_keys")
