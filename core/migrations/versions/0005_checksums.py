"""What the audit compares besides counts: the ids' checksums and the load's ledger fence.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

- `checksum`: the order-independent checksum of the ids extract staged (`core.checksum`);
- `target_checksum`: the same checksum over the target's rows when the audit looked;
- `load_fence`: the fence the window's last load took in the target's ledger.
All three are results of a run: cleared when the window's chain starts over.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("windows") as batch:
        batch.add_column(sa.Column("checksum", sa.String(16), nullable=True))
        batch.add_column(sa.Column("target_checksum", sa.String(16), nullable=True))
        batch.add_column(sa.Column("load_fence", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("windows") as batch:
        for name in ("load_fence", "target_checksum", "checksum"):
            batch.drop_column(name)
