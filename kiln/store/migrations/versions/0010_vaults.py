"""Vaults: credentials (sealed), the services they go to, and the calls they went into.

Revision ID: 0010_vaults
Revises: 0009_volumes
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_vaults"
down_revision: str | None = "0009_volumes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _owner() -> sa.Column:
    users = sa.ForeignKey("users.id", ondelete="CASCADE")
    return sa.Column("owner_id", sa.Integer, users, nullable=False, index=True)


def _vault() -> sa.Column:
    vaults = sa.ForeignKey("vaults.id", ondelete="CASCADE")
    return sa.Column("vault_id", sa.String(64), vaults, nullable=False, index=True)


def upgrade() -> None:
    op.create_table(
        "vaults",
        sa.Column("id", sa.String(64), primary_key=True),
        _owner(),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "vault_credentials",
        sa.Column("id", sa.String(64), primary_key=True),
        _owner(),
        _vault(),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("credential_type", sa.String(64), nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("sealed_value", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("vault_id", "name", name="uq_vault_credentials_name"),
    )
    op.create_table(
        "vault_services",
        sa.Column("id", sa.String(64), primary_key=True),
        _owner(),
        _vault(),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("auth_config", sa.JSON, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("description", sa.Text, nullable=True),
        sa.Column("template_id", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("vault_id", "host", name="uq_vault_services_host"),
    )
    op.create_table(
        "vault_calls",
        sa.Column("id", sa.String(64), primary_key=True),
        _owner(),
        _vault(),
        sa.Column("vm_id", sa.String(64), nullable=False),
        sa.Column("service_id", sa.String(64), nullable=False),
        sa.Column("credential_id", sa.String(64), nullable=False),
        sa.Column("credential_name", sa.String(128), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("method", sa.String(32), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, index=True),
    )


def downgrade() -> None:
    for table in ("vault_calls", "vault_services", "vault_credentials", "vaults"):
        op.drop_table(table)
