"""Host resources: what Kiln made on the host for each VM, recorded before it exists.

Revision ID: 0004_host_resources
Revises: 0003_snapshots
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_host_resources"
down_revision: str | None = "0003_snapshots"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "host_resources",
        sa.Column("kind", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(512), primary_key=True),
        sa.Column("vm_id", sa.String(64), nullable=False, index=True),
        sa.Column("owner_id", sa.Integer, nullable=True),
        sa.Column("detail", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("host_resources")
