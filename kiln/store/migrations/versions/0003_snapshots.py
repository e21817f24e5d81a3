"""Snapshots: the snapshots table and the VM columns that refer to it.

Revision ID: 0003_snapshots
Revises: 0002_execution_tasks
Create Date: 2025-01-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_snapshots"
down_revision: str | None = "0002_execution_tasks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VM_SNAPSHOT_COLUMNS = ("snapshot_id", "disk_snapshot_id", "terminate_snapshot_id")


def upgrade() -> None:
    op.create_table(
        "snapshots",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True
        ),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text, nullable=True),
        sa.Column("vcpu_count", sa.Integer, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("image_variant", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("source_vm_id", sa.String(64), nullable=True),
        sa.Column("parent_id", sa.String(64), nullable=True),
        sa.Column("directory", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_snapshots_owner_id", "snapshots", ["owner_id"])
    op.create_index("ix_snapshots_type", "snapshots", ["type"])
    op.create_index("ix_snapshots_parent_id", "snapshots", ["parent_id"])
    # batch mode: SQLite cannot add indexed columns in place otherwise.
    with op.batch_alter_table("vms") as batch:
        for name in VM_SNAPSHOT_COLUMNS:
            batch.add_column(sa.Column(name, sa.String(64), nullable=True))
        batch.create_index("ix_vms_disk_snapshot_id", ["disk_snapshot_id"])


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.drop_index("ix_vms_disk_snapshot_id")
        for name in VM_SNAPSHOT_COLUMNS:
            batch.drop_column(name)
    op.drop_index("ix_snapshots_parent_id", "snapshots")
    op.drop_index("ix_snapshots_type", "snapshots")
    op.drop_index("ix_snapshots_owner_id", "snapshots")
    op.drop_table("snapshots")
