"""The `windows` table: one durable record per (pipeline, window_start).

Revision ID: 0001
Revises:
Create Date: 2026-11-01

The schema is written out here rather than imported from `core.store`, so this revision keeps
creating exactly this table however the model changes later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_STATUSES = "'pending', 'queued', 'running', 'succeeded', 'skipped', 'failed', 'dead'"
_STAGES = "'precheck', 'extract', 'load', 'audit'"
_KINDS = "'scheduled', 'manual'"


def _instant(name: str, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "windows",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("pipeline", sa.String(200), nullable=False),
        _instant("window_start", nullable=False),
        _instant("window_end", nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("stage", sa.String(16), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False, server_default="scheduled"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("source_count", sa.BigInteger(), nullable=True),
        sa.Column("staged_count", sa.BigInteger(), nullable=True),
        sa.Column("target_count", sa.BigInteger(), nullable=True),
        sa.Column("rejected_count", sa.BigInteger(), nullable=True),
        sa.Column("fence", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("manifest", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        _instant("created_at", nullable=False),
        _instant("updated_at", nullable=False),
        _instant("started_at", nullable=True),
        _instant("finished_at", nullable=True),
        sa.UniqueConstraint("pipeline", "window_start", name="uq_windows_pipeline_window_start"),
        sa.CheckConstraint(f"status IN ({_STATUSES})", name="ck_windows_status"),
        sa.CheckConstraint(f"stage IS NULL OR stage IN ({_STAGES})", name="ck_windows_stage"),
        sa.CheckConstraint(f"kind IN ({_KINDS})", name="ck_windows_kind"),
        sa.CheckConstraint("window_end > window_start", name="ck_windows_window_order"),
    )
    op.create_index("ix_windows_pipeline_status", "windows", ["pipeline", "status"])


def downgrade() -> None:
    op.drop_index("ix_windows_pipeline_status", table_name="windows")
    op.drop_table("windows")
