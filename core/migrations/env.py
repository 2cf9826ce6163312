"""Alembic environment of the state store.

Migrations run only through `StateStore.migrate()`, which opens the transaction, takes the
migration lock (a PostgreSQL advisory lock or SQLite's write lock) and hands its connection
over in `config.attributes["connection"]`. Running them inside that transaction is what makes
two processes migrating a fresh database at once safe: the second waits, then finds `head`.
"""

from __future__ import annotations

from alembic import context

from core.store.schema import METADATA

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the state store's migrations with StateStore(url).migrate()")

context.configure(
    connection=connection,
    target_metadata=METADATA,
    # SQLite cannot ALTER most things in place; batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
