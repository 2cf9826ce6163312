"""A partial index on the windows queued or running, by stage: what KEDA's query counts.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05

deploy/kubernetes/keda.yaml scales each stage's pool on
`SELECT count(*) FROM windows WHERE stage = 'X' AND status IN ('queued', 'running')` every 15 s
per stage, and the exporter reads the same backlog of every pipeline at each scrape. The index
holds only the windows in flight (a few, whatever the history), so both are an index-only
count instead of a scan of the table. Its predicate is written exactly as the queries write
theirs: PostgreSQL uses a partial index only when the query's WHERE implies the predicate.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

ACTIVE = "status IN ('queued', 'running')"


def upgrade() -> None:
    op.create_index(
        "ix_windows_active_stage",
        "windows",
        ["stage", "status", "pipeline"],
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )


def downgrade() -> None:
    op.drop_index("ix_windows_active_stage", table_name="windows")
