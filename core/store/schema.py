"""The `windows` table: its columns, constraints and indexes, the instant type both backends
share, and a row as a `WindowRecord`. Private to `core.store`: nothing outside the package
names the table (the migrations compare against `METADATA`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect, Row

from core.instants import as_utc
from core.records import Stage, WindowKind, WindowRecord, WindowStatus

MIGRATIONS_DIR = Path(__file__).parent.parent / "migrations"
"""Alembic's script location: the migrations ship inside the package."""


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An instant stored as UTC and returned aware UTC; naive datetimes are refused.

    PostgreSQL keeps it in `timestamptz`; SQLite has no time zones, so it stores the naive UTC
    wall time (as fixed-width text, which also sorts and compares correctly).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = _aware(value, "instant").astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)


METADATA = sa.MetaData()
"""The state store's schema (created by the alembic migrations, never by `create_all`)."""


def _in_list(column: str, values: Collection[str]) -> str:
    return f"{column} IN ({', '.join(repr(str(v)) for v in values)})"


WINDOWS = sa.Table(
    "windows",
    METADATA,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("pipeline", sa.String(200), nullable=False),
    sa.Column("window_start", UTCDateTime(), nullable=False),
    sa.Column("window_end", UTCDateTime(), nullable=False),
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
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("updated_at", UTCDateTime(), nullable=False),
    sa.Column("started_at", UTCDateTime(), nullable=True),
    sa.Column("finished_at", UTCDateTime(), nullable=True),
    sa.Column("source_version", sa.Text(), nullable=True),
    sa.Column("rechecks_done", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("checked_at", UTCDateTime(), nullable=True),
    sa.Column("drift", sa.JSON(), nullable=True),
    sa.Column("checksum", sa.String(16), nullable=True),
    sa.Column("target_checksum", sa.String(16), nullable=True),
    sa.Column("load_fence", sa.BigInteger(), nullable=True),
    sa.UniqueConstraint("pipeline", "window_start", name="uq_windows_pipeline_window_start"),
    sa.CheckConstraint(_in_list("status", list(WindowStatus)), name="ck_windows_status"),
    sa.CheckConstraint(
        f"stage IS NULL OR {_in_list('stage', list(Stage))}", name="ck_windows_stage"
    ),
    sa.CheckConstraint(_in_list("kind", list(WindowKind)), name="ck_windows_kind"),
    sa.CheckConstraint("window_end > window_start", name="ck_windows_window_order"),
    sa.Index("ix_windows_pipeline_status", "pipeline", "status"),
    sa.Index("ix_windows_frontier", "pipeline", "kind", "window_end"),
    sa.Index("ix_windows_recheck", "pipeline", "rechecks_done", "window_end"),
    sa.Index(
        "ix_windows_drifted",
        "pipeline",
        sqlite_where=sa.text("drift IS NOT NULL"),
        postgresql_where=sa.text("drift IS NOT NULL"),
    ),
    # KEDA's per-stage count and the exporter's backlog (migration 0004).
    sa.Index(
        "ix_windows_active_stage",
        "stage",
        "status",
        "pipeline",
        sqlite_where=sa.text("status IN ('queued', 'running')"),
        postgresql_where=sa.text("status IN ('queued', 'running')"),
    ),
)
"""One row per (pipeline, window_start); the columns are the fields of `WindowRecord`."""


COLUMN_NAMES: tuple[str, ...] = tuple(column.name for column in WINDOWS.c)
"""The columns of `windows` in table order: the order of `select(WINDOWS)` and of
`RETURNING *WINDOWS.c`."""


def _to_record(row: Row[Any]) -> WindowRecord:
    return _record_of(row._mapping)


def _record_from_values(values: Sequence[Any]) -> WindowRecord:
    """A record from a row's values in `COLUMN_NAMES` order, each already as SQLAlchemy's
    column type returns it (aware UTC instants, parsed JSON)."""
    return _record_of(dict(zip(COLUMN_NAMES, values, strict=True)))


def _record_of(data: Mapping[Any, Any]) -> WindowRecord:
    return WindowRecord(
        id=data["id"],
        pipeline=data["pipeline"],
        window_start=data["window_start"],
        window_end=data["window_end"],
        status=WindowStatus(data["status"]),
        stage=Stage(data["stage"]) if data["stage"] is not None else None,
        kind=WindowKind(data["kind"]),
        attempts=data["attempts"],
        source_count=data["source_count"],
        staged_count=data["staged_count"],
        target_count=data["target_count"],
        rejected_count=data["rejected_count"],
        fence=data["fence"],
        manifest=data["manifest"],
        error=data["error"],
        created_at=data["created_at"],
        updated_at=data["updated_at"],
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        source_version=data["source_version"],
        rechecks_done=data["rechecks_done"],
        checked_at=data["checked_at"],
        drift=list(data["drift"] or []),
        checksum=data["checksum"],
        target_checksum=data["target_checksum"],
        load_fence=data["load_fence"],
    )


def _key(pipeline: str, window_start: datetime) -> tuple[sa.ColumnElement[bool], ...]:
    """The WHERE clauses selecting one record."""
    return (WINDOWS.c.pipeline == pipeline, WINDOWS.c.window_start == _aware(window_start))


def _aware(value: datetime, what: str = "window_start") -> datetime:
    """`value`, refused if naive: a record's identity must never depend on a machine's zone."""
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} {value.isoformat()} is naive; the state store needs UTC")
    return value


def _values(statuses: Collection[WindowStatus]) -> list[str]:
    return [WindowStatus(s).value for s in statuses]
