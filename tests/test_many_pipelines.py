"""Many pipelines on one database: connections grow with worker processes, not pipelines.

Real PostgreSQL, real Celery workers (one per stage queue at -c 2, one control worker), 200
pipelines each reading its own source table and loading its own target table, all in one
database that allows fewer connections than there are pipelines.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery

from bench.common import ConnectionSampler
from core.instants import format_instant
from tests.conftest import PG_ADMIN_URL
from tests.support import wait_until
from tests.support.deployment import STAGE_QUEUES, Deployment, write_config

pytestmark = pytest.mark.integration

PIPELINES = 200
DATABASE_LIMIT = 40
"""The database's CONNECTION LIMIT: fewer than the pipelines, more than the bound below."""

STAGE_CONCURRENCY = 2
ENGINES_PER_PROCESS = 3
"""The README's bound per worker process on one database: the state store's, the sources'
and the targets' engines, one connection each while a task uses it (prefork: one task at a
time per process)."""


@pytest.fixture
def limited_database() -> Iterator[tuple[str, str]]:
    """A database owned by a role of its own (limits do not apply to superusers), with a
    CONNECTION LIMIT; yields (the role's URL for the workers, the admin URL to it)."""
    name = f"wp_many_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE ROLE "{name}" LOGIN'))
        conn.execute(
            sa.text(f'CREATE DATABASE "{name}" OWNER "{name}" CONNECTION LIMIT {DATABASE_LIMIT}')
        )
    base = sa.make_url(PG_ADMIN_URL)
    role_url = base.set(username=name, database=name).render_as_string(hide_password=False)
    admin_url = base.set(database=name).render_as_string(hide_password=False)
    try:
        yield role_url, admin_url
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"
                ),
                {"name": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(sa.text(f'DROP ROLE IF EXISTS "{name}"'))
        admin.dispose()


def seed(role_url: str, origin: datetime) -> None:
    """Table `src_N` per pipeline with two rows in the pipeline's one window; ids are unique
    across tables."""
    engine = sa.create_engine(role_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        for index in range(PIPELINES):
            conn.exec_driver_sql(
                f"CREATE TABLE src_{index} (id BIGINT PRIMARY KEY, "
                "created_at TIMESTAMPTZ NOT NULL, payload TEXT)"
            )
            conn.execute(
                sa.text(f"INSERT INTO src_{index} VALUES (:id, :at, 'x')"),
                [
                    {"id": 2 * index + 1, "at": origin + timedelta(minutes=1)},
                    {"id": 2 * index + 2, "at": origin + timedelta(minutes=59)},
                ],
            )
    engine.dispose()


def ids(admin_url: str, prefix: str, column: str) -> Counter[str]:
    engine = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
    found: Counter[str] = Counter()
    with engine.connect() as conn:
        for index in range(PIPELINES):
            table = f"{prefix}_{index}"
            if conn.execute(sa.text("SELECT to_regclass(:t)"), {"t": table}).scalar() is None:
                continue
            rows = conn.execute(sa.text(f"SELECT {column} FROM {table}"))
            found.update(str(row[0]) for row in rows)
    engine.dispose()
    return found


def window_statuses(admin_url: str) -> dict[str, int]:
    engine = sa.create_engine(admin_url, poolclass=sa.pool.NullPool)
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT status, count(*) FROM windows GROUP BY status"))
        counts = {str(status): int(count) for status, count in rows}
    engine.dispose()
    return counts


def test_two_hundred_pipelines_on_one_database_hold_connections_per_process_not_per_pipeline(
    tmp_path: Path, limited_database: tuple[str, str], redis_db: str
) -> None:
    role_url, admin_url = limited_database
    role = str(sa.make_url(role_url).username)
    now = datetime.now(UTC)
    origin = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    seed(role_url, origin)
    pipeline = {
        "window": "1h",
        "start": format_instant(origin),
        "max_windows_per_tick": 1,  # one window per pipeline
        "every": "1h",
        "staging": {"type": "local", "path": str(tmp_path / "staging")},
    }
    config = write_config(
        tmp_path / "windowpipe.toml",
        {"redis_url": redis_db, "state_url": role_url, "failed_retry_base": "1s"},
        {
            f"p{index}": {
                **pipeline,
                "source": {"type": "sql", "url": role_url, "table": f"src_{index}"},
                "target": {"type": "sql", "url": role_url, "table": f"dst_{index}"},
            }
            for index in range(PIPELINES)
        },
    )
    dep = Deployment(config_path=config, workdir=tmp_path)
    dep.store().dispose()  # the state store's tables, before anything counts connections
    try:
        dep.start_workers(STAGE_QUEUES, STAGE_CONCURRENCY)
        dep.start_worker("control", 1)
        processes = len(STAGE_QUEUES) * STAGE_CONCURRENCY + 1
        bound = processes * ENGINES_PER_PROCESS
        assert bound < DATABASE_LIMIT < PIPELINES

        with ConnectionSampler(PG_ADMIN_URL, role=role, every=0.2) as sampler:
            # As beat sends it: a generation task per group of 50 pipelines.
            app = Celery(broker=redis_db)
            names = [f"p{index}" for index in range(PIPELINES)]
            for first in range(0, PIPELINES, 50):
                group = names[first : first + 50]
                app.send_task("windowpipe.generate_batch", (group,), queue="control")
            app.close()

            def all_finished() -> bool:
                assert sampler.highest <= bound, (
                    f"{sampler.highest} connections to the database, more than {bound} "
                    f"({processes} worker processes x {ENGINES_PER_PROCESS})"
                )
                counts = window_statuses(admin_url)
                return counts.get("succeeded", 0) == PIPELINES and sum(counts.values()) == PIPELINES

            wait_until(all_finished, 900, "every pipeline's window to succeed", every=1)

        assert ids(admin_url, "dst", "doc_id") == ids(admin_url, "src", "id")
        assert sum(ids(admin_url, "dst", "doc_id").values()) == 2 * PIPELINES
        assert 0 < sampler.highest <= bound
    finally:
        dep.stop_all()
