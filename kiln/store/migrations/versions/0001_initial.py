"""Users, API keys, sessions and VMs.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def timestamp(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=True),
        timestamp("created_at"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False, unique=True),
        timestamp("created_at"),
        timestamp("last_used_at", nullable=True),
    )
    op.create_index("ix_api_keys_owner_id", "api_keys", ["owner_id"])
    op.create_table(
        "sessions",
        sa.Column(
            "owner_id",
            sa.Integer,
            sa.ForeignKey("users.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("id", sa.String(128), primary_key=True),
        timestamp("created_at"),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column(
            "owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text, nullable=True),
        sa.Column("vcpu_count", sa.Integer, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("image_variant", sa.String(64), nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("env_status", sa.String(16), nullable=False),
        sa.Column("env_error", sa.Text, nullable=True),
        sa.Column("egress_policy", sa.JSON, nullable=True),
        sa.Column("share", sa.JSON, nullable=True),
        sa.Column("custom_domain", sa.JSON, nullable=True),
        sa.Column("volumes", sa.JSON, nullable=False),
        sa.Column("vault_ids", sa.JSON, nullable=False),
        sa.Column("snapshot_on_terminate", sa.Boolean, nullable=False),
        sa.Column("snapshot_name", sa.String(255), nullable=True),
        sa.Column("auto_suspend", sa.Boolean, nullable=False),
        sa.Column("auto_resume", sa.Boolean, nullable=False),
        timestamp("created_at"),
        timestamp("updated_at"),
        timestamp("expires_at"),
        timestamp("terminated_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["owner_id", "session_id"],
            ["sessions.owner_id", "sessions.id"],
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_vms_owner_id", "vms", ["owner_id"])
    op.create_index("ix_vms_status", "vms", ["status"])
    op.create_index("ix_vms_expires_at", "vms", ["expires_at"])


def downgrade() -> None:
    op.drop_table("vms")
    op.drop_table("sessions")
    op.drop_table("api_keys")
    op.drop_table("users")
