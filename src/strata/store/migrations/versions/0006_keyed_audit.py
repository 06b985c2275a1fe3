"""the audit chain is keyed: each row names the encryption key whose derived HMAC key signed it

Rows from before have no key id and keep their plain SHA-256 hashes: they are verified that way and
reported as unkeyed (the first keyed row signs their head).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("audit_events", sa.Column("kid", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("audit_events", "kid")
