"""runs remember the API key that started them: usage by key and key budgets count agent steps too

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("key_id", sa.String(length=40), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "key_id")
