"""The usage ledger's disk: what a VM's disk may grow to, per interval
(suspended VMs get intervals of their own, with their disk and saved memory).

Revision ID: 0014_usage_disk
Revises: 0013_usage
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_usage_disk"
down_revision: str | None = "0013_usage"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows written before this migration counted no disk.
    op.add_column("usage_intervals", sa.Column("disk_mb", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("usage_intervals") as batch:
        batch.drop_column("disk_mb")
