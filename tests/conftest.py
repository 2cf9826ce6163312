"""Shared fixtures: real PostgreSQL and Redis, fresh per test session; SQLite in tmp dirs.

A test that reaches a real service (PostgreSQL, Redis, RabbitMQ, worker processes) or an
emulator server (fakesnow, moto, osmem) is marked `integration`, by its module, itself or the
fixture param that brings the service in (`state_url`'s PostgreSQL run). Integration tests fail
(never skip) when a service is missing: `make test` starts them. The rest, `pytest -m "not
integration"`, needs no service and runs in seconds (runner, dispatch and recovery on in-memory
systems: tests/test_window_lifecycle.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import fakesnow
import pytest
import sqlalchemy as sa

# fakesnow's `server()` imports its submodule `fakesnow.server`, which then shadows the function
# on the package: a second `fakesnow.server(...)` in the same process would call a module.
# Bind the function once, at import, before anything runs it.
start_fakesnow_server = fakesnow.server

PG_ADMIN_URL = os.environ.get(
    "WINDOWPIPE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
"""A PostgreSQL URL allowed to create and drop databases."""

REDIS_TEST_URL = os.environ.get("WINDOWPIPE_TEST_REDIS_URL", "redis://127.0.0.1:6379")
"""The Redis server the tests use; each test run takes its own DB number and flushes it."""


@pytest.fixture(scope="session")
def fakesnow_server() -> Iterator[dict[str, Any]]:
    """fakesnow's HTTP server, one per test session; yields the connect kwargs it returns: user,
    password, account, host, port, protocol ("http"), session_parameters, network_timeout."""
    with start_fakesnow_server(port=None, host="127.0.0.1") as kwargs:
        yield kwargs


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"wp_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture
def pg_schema_url(pg_database_url: str) -> Iterator[str]:
    """A PostgreSQL URL whose default schema is a fresh one, dropped after the test."""
    schema = f"s_{uuid.uuid4().hex[:10]}"
    engine = sa.create_engine(pg_database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_database_url else "?"
    yield f"{pg_database_url}{sep}options=-csearch_path%3D{schema}"
    with engine.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


@pytest.fixture
def sqlite_url(tmp_path: os.PathLike[str]) -> str:
    """A SQLite file URL in the test's temporary directory."""
    return f"sqlite:///{tmp_path}/state.db"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def state_url(request: pytest.FixtureRequest) -> str:
    """The same test on SQLite and on PostgreSQL (that run is an integration test)."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_schema_url"))


@pytest.fixture
def redis_db() -> Iterator[str]:
    """A Redis URL on a DB number no other test holds, flushed before and after."""
    import redis

    from tests.support.deployment import free_redis_db, release_redis_db

    number = free_redis_db(REDIS_TEST_URL)
    url = f"{REDIS_TEST_URL}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    release_redis_db(REDIS_TEST_URL, number)


@pytest.fixture
def stop_all() -> Iterator[list[Any]]:
    """Deployments (tests.support.deployment.Deployment) registered here have every process stopped
    after the test."""
    import contextlib
    import signal

    deployments: list[Any] = []
    yield deployments
    for dep in deployments:
        for _, process in dep.processes:
            # A worker left stopped by a failed test must be able to die; all of them shut
            # down at once rather than one after the other.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGTERM)
        dep.stop_all()
