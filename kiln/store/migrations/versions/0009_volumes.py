"""Volumes: volumes, their checkpoints, their mounts in VMs, and the drives a
snapshot was saved with. A VM's mounts are rows of their own now, so the unused
``vms.volumes`` JSON column goes.

Revision ID: 0009_volumes
Revises: 0008_egress_network_error
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_volumes"
down_revision: str | None = "0008_egress_network_error"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _owner() -> sa.Column:
    return sa.Column(
        "owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True
    )


def upgrade() -> None:
    op.create_table(
        "volumes",
        sa.Column("id", sa.String(64), primary_key=True),
        _owner(),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("quota_bytes", sa.BigInteger, nullable=False),
        sa.Column("used_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "volume_checkpoints",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "volume_id", sa.String(64), sa.ForeignKey("volumes.id", ondelete="CASCADE"),
            nullable=False, index=True,
        ),  # fmt: skip
        _owner(),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "volume_mounts",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "vm_id", sa.String(64), sa.ForeignKey("vms.id", ondelete="CASCADE"), nullable=False, index=True
        ),
        _owner(),
        sa.Column(
            "volume_id", sa.String(64), sa.ForeignKey("volumes.id", ondelete="CASCADE"),
            nullable=False, index=True,
        ),  # fmt: skip
        sa.Column("mount_path", sa.String(1024), nullable=False),
        sa.Column("mode", sa.String(2), nullable=False),
        sa.Column("checkpoint_id", sa.String(64), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("vm_id", "mount_path"),
    )
    with op.batch_alter_table("snapshots") as batch:
        batch.add_column(sa.Column("mounts", sa.JSON, nullable=False, server_default=sa.text("'[]'")))
    with op.batch_alter_table("snapshots") as batch:
        batch.alter_column("mounts", server_default=None)
    with op.batch_alter_table("vms") as batch:
        batch.drop_column("volumes")


def downgrade() -> None:
    with op.batch_alter_table("vms") as batch:
        batch.add_column(sa.Column("volumes", sa.JSON, nullable=False, server_default=sa.text("'[]'")))
    with op.batch_alter_table("vms") as batch:
        batch.alter_column("volumes", server_default=None)
    with op.batch_alter_table("snapshots") as batch:
        batch.drop_column("mounts")
    op.drop_table("volume_mounts")
    op.drop_table("volume_checkpoints")
    op.drop_table("volumes")
