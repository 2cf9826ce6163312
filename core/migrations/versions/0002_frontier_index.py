"""An index for the generation frontier: the newest window end of a pipeline, by kind.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

`max(window_end) WHERE pipeline = ? AND kind = ?` runs every generation tick; without this
index it scans the pipeline's whole history, so a tick grew with the number of windows.
"""

from __future__ import annotations

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_windows_frontier", "windows", ["pipeline", "kind", "window_end"])


def downgrade() -> None:
    op.drop_index("ix_windows_frontier", table_name="windows")
