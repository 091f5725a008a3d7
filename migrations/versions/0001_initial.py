"""Initial schema: models, fingerprints, jobs, transcripts, votes.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01 00:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("descriptor", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "fingerprints",
        sa.Column(
            "model_id",
            sa.String(128),
            sa.ForeignKey("models.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("n_challenges", sa.Integer(), nullable=False),
        sa.Column("bits", sa.Integer(), nullable=False),
        sa.Column("sites", sa.JSON(), nullable=False),
        sa.Column("descriptor", sa.JSON(), nullable=False),
        sa.Column("commitment", sa.String(64), nullable=True),
        sa.Column("doc", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("device", sa.String(8), nullable=False),
        sa.Column("queue", sa.String(64), nullable=False),
        sa.Column(
            "reference_model_id",
            sa.String(128),
            sa.ForeignKey("models.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("reference_path", sa.Text(), nullable=True),
        sa.Column("candidate_path", sa.Text(), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=True),
        sa.Column("commitment", sa.String(64), nullable=True),
        sa.Column("challenges_done", sa.Integer(), nullable=False),
        sa.Column("challenges_max", sa.Integer(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.JSON(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("decided_at", TS, nullable=True),
        sa.Column("consensus_dispatched_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
    )
    op.create_index("ix_jobs_status", "jobs", ["status"])
    op.create_index("ix_jobs_created_id", "jobs", ["created_at", "id"])
    op.create_table(
        "transcripts",
        sa.Column(
            "job_id",
            sa.String(36),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("root", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=False),
        sa.Column("doc", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_table(
        "votes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "job_id",
            sa.String(36),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("validator", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("digest", sa.String(64), nullable=False),
        sa.Column("problems", sa.JSON(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("job_id", "validator", name="uq_votes_job_validator"),
    )
    op.create_index("ix_votes_job_id", "votes", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_votes_job_id", table_name="votes")
    op.drop_table("votes")
    op.drop_table("transcripts")
    op.drop_index("ix_jobs_created_id", table_name="jobs")
    op.drop_index("ix_jobs_status", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("fingerprints")
    op.drop_table("models")
