"""runs remember the models their API key may use: agent steps and fallbacks are held to the key's allow-list

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("allowed_models", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "allowed_models")
