"""indexes for the lists of runs and sessions, newest first (GET /v1/runs, GET /v1/sessions)

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_runs_created", "runs", ["created_at", "id"])
    op.create_index("ix_runs_owner_created", "runs", ["owner", "created_at"])
    op.create_index("ix_sessions_created", "sessions", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_sessions_created", table_name="sessions")
    op.drop_index("ix_runs_owner_created", table_name="runs")
    op.drop_index("ix_runs_created", table_name="runs")
