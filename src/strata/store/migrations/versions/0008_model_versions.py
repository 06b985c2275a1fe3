"""cluster-wide model versions: the desired version of each model, what each replica serves, config
reloads every replica applies; runs remember their model so only a replica serving it claims them

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_AUTO_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.add_column("runs", sa.Column("model", sa.String(length=128), nullable=True))
    op.create_table(
        "model_versions",
        sa.Column("model", sa.String(length=128), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("allocated", sa.Integer(), nullable=False),
        sa.Column("reference", sa.JSON(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=160), nullable=True),
    )
    op.create_table(
        "model_replicas",
        sa.Column("replica", sa.String(length=96), primary_key=True),
        sa.Column("model", sa.String(length=128), primary_key=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("desired", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "config_reloads",
        sa.Column("id", _AUTO_ID, primary_key=True, autoincrement=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("by", sa.String(length=160), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("config_reloads")
    op.drop_table("model_replicas")
    op.drop_table("model_versions")
    op.drop_column("runs", "model")
