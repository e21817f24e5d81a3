"""Execution tasks (POST /execute_async).

Revision ID: 0002_execution_tasks
Revises: 0001
Create Date: 2025-01-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_execution_tasks"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "execution_tasks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("language", sa.String(16), nullable=False),
        sa.Column("command", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("stdout", sa.Text, nullable=False),
        sa.Column("stderr", sa.Text, nullable=False),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("cpu_time", sa.Float, nullable=True),
        sa.Column("execution_time", sa.Float, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_execution_tasks_owner_id", "execution_tasks", ["owner_id"])
    op.create_index("ix_execution_tasks_status", "execution_tasks", ["status"])


def downgrade() -> None:
    op.drop_index("ix_execution_tasks_status", "execution_tasks")
    op.drop_index("ix_execution_tasks_owner_id", "execution_tasks")
    op.drop_table("execution_tasks")
