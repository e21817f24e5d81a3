"""Custom domains: a user's domain served over HTTPS for one share.

Revision ID: 0006_custom_domains
Revises: 0005_shares
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_custom_domains"
down_revision: str | None = "0005_shares"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "custom_domains",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("owner_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True),
        sa.Column("domain", sa.String(253), nullable=False, unique=True),
        sa.Column("share_id", sa.String(64), nullable=False, index=True),
        sa.Column("vm_id", sa.String(64), nullable=False, index=True),
        sa.Column("made_with_vm", sa.Boolean, nullable=False),
        sa.Column("dns_provider", sa.String(32), nullable=False),
        sa.Column("dns_credentials", sa.Text, nullable=True),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("dns_records", sa.JSON, nullable=False),
        sa.Column("published", sa.JSON, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("progress", sa.Text, nullable=True),
        sa.Column("acme_order", sa.JSON, nullable=True),
        sa.Column("certificate", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True, index=True),
    )


def downgrade() -> None:
    op.drop_table("custom_domains")
