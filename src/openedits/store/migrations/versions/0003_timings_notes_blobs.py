"""Task timings and notes, and inline input bytes beside the submit body.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("timings", sa.JSON, nullable=True))
        batch.add_column(sa.Column("notes", sa.JSON, nullable=True))
    with op.batch_alter_table("task_payloads") as batch:
        batch.add_column(sa.Column("data", sa.LargeBinary, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("task_payloads") as batch:
        batch.drop_column("data")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("notes")
        batch.drop_column("timings")
