"""Egress: why a VM that asked for egress has no network (the host gives none).

Revision ID: 0008_egress_network_error
Revises: 0007_ssh_keys
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_egress_network_error"
down_revision: str | None = "0007_ssh_keys"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("vms", sa.Column("network_error", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("vms", "network_error")
