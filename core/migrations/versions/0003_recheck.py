"""Recheck state on the window record: the source's fingerprint, horizons checked, drift.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29

- `source_version`: the max of the source's version field in the window when it was counted
  (with `source_count`, the fingerprint a recheck compares against);
- `rechecks_done`: how many of the pipeline's recheck horizons this window has passed;
- `checked_at`: when the source was last compared with the record (recheck or reconcile);
- `drift`: every drift found, as a JSON list (when, source before -> after).
The index lets a recheck tick find the windows due at each horizon without a scan of history.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("windows") as batch:
        batch.add_column(sa.Column("source_version", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("rechecks_done", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("checked_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("drift", sa.JSON(), nullable=True))
    op.create_index("ix_windows_recheck", "windows", ["pipeline", "rechecks_done", "window_end"])
    # Windows that ever drifted (a few): the metrics count them without a scan.
    op.create_index(
        "ix_windows_drifted",
        "windows",
        ["pipeline"],
        sqlite_where=sa.text("drift IS NOT NULL"),
        postgresql_where=sa.text("drift IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_windows_drifted", table_name="windows")
    op.drop_index("ix_windows_recheck", table_name="windows")
    with op.batch_alter_table("windows") as batch:
        for name in ("drift", "checked_at", "rechecks_done", "source_version"):
            batch.drop_column(name)
