"""Alembic revisions of the state store, one file per schema change."""
