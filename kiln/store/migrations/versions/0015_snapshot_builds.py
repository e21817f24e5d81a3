"""Snapshot builds: the progress log of a snapshot built from build_args.

Revision ID: 0015_snapshot_builds
Revises: 0014_usage_disk
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_snapshot_builds"
down_revision: str | None = "0014_usage_disk"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.add_column(sa.Column("build_log", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_column("build_log")
