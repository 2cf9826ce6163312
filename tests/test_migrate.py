"""Read commands never migrate: `status`, `plan`, `validate` (with or without `--rebuild`),
`locks` (with or without `--cleanup`) and `check` leave a state store without the schema exactly
as it was and say so in one line; `windowpipe migrate` creates or upgrades the schema and then
they work. Run on SQLite and PostgreSQL, through the real console script.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from core.store import MIGRATIONS_DIR, StateStore
from tests.conftest import REDIS_TEST_URL
from tests.support.console import StateWorld, assert_one_error_line, run_windowpipe
from tests.support.deployment import free_redis_db, release_redis_db, write_config

pytestmark = pytest.mark.integration


def _revisions() -> tuple[str, str]:
    """(the first, the newest) schema revision this windowpipe ships."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    assert head is not None
    base = script.get_bases()[0]
    return base, head


BASE, HEAD = _revisions()
"""The first and the newest schema revision this windowpipe ships."""


def _migrate_only_to(url: str, revision: str) -> None:
    """Bring a fresh store to an older revision, as an older windowpipe would have left it."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()


PIPELINE: dict[str, Any] = {
    "window": "15m",
    "start": "2026-11-01T00:00:00Z",
    "lag": "5m",
    "source": {"type": "sql", "url": "sqlite:///source.db", "table": "events"},
    "staging": {"type": "local", "path": "./staging"},
    "target": {"type": "sql", "url": "sqlite:///target.db", "table": "events_loaded"},
}

READ_COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "status-pipeline": ["status", "orders", "--json"],
    "plan": ["plan", "orders", "--now", "2026-11-01T02:07:00Z", "--json"],
    "validate": ["validate", "orders"],
    "validate-rebuild": ["validate", "orders", "--rebuild"],
    "locks": ["locks"],
    "locks-cleanup": ["locks", "--cleanup"],
}
"""Commands that must find the schema in place and never create or upgrade it."""


@pytest.fixture
def redis_url() -> Iterator[str]:
    number = free_redis_db(REDIS_TEST_URL)
    url = f"{REDIS_TEST_URL}/{number}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        release_redis_db(REDIS_TEST_URL, number)


@pytest.fixture
def world(state_url: str, redis_url: str, tmp_path: Path) -> Iterator[StateWorld]:
    """A state store with no windowpipe schema at all: a SQLite file that does not exist, or an
    empty PostgreSQL schema."""
    if state_url.startswith("sqlite"):
        file = Path(make_url(state_url).database or "")
        file.parent.mkdir(exist_ok=True)
        world = StateWorld(state_url, redis_url, sqlite_file=file)
    else:
        schema = make_url(state_url).query["options"]
        assert isinstance(schema, str)
        world = StateWorld(state_url, redis_url, pg_schema=schema.split("=", 1)[1])
    yield world
    world.close()


@pytest.fixture
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Overrides conftest's: the SQLite file lives in a directory of its own, so "nothing
    appeared" can be checked on the whole directory."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'state' / 'state.db'}"
    return str(request.getfixturevalue("pg_schema_url"))


def _config(tmp_path: Path, world: StateWorld) -> Path:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return write_config(
        work / "windowpipe.toml",
        {"state_url": world.state_url, "redis_url": world.redis_url},
        {"orders": PIPELINE},
    )


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


BACKENDS = pytest.mark.parametrize("state_url", ["sqlite", "postgresql"], indirect=True)


@BACKENDS
@pytest.mark.parametrize("command", list(READ_COMMANDS))
def test_a_read_command_on_a_store_without_the_schema_says_so_and_creates_nothing(
    tmp_path: Path, world: StateWorld, command: str
) -> None:
    config = _config(tmp_path, world)
    before = world.snapshot()
    run = run_windowpipe(*READ_COMMANDS[command], cwd=config.parent, config=config)
    line = assert_one_error_line(run, 2)
    assert line == (
        f"windowpipe: error: the state store at {_shown(world.state_url)} has no windowpipe "
        f"schema; run `windowpipe migrate`"
    )
    assert world.snapshot() == before, run.describe()
    if world.sqlite_file is not None:
        assert not world.sqlite_file.exists()
    else:
        assert before["tables"] == {}


@BACKENDS
def test_check_reports_a_missing_schema_as_a_problem_without_creating_it(
    tmp_path: Path, world: StateWorld
) -> None:
    config = _config(tmp_path, world)
    before = world.snapshot()
    run = run_windowpipe("check", cwd=config.parent, config=config)
    assert run.returncode == 1, run.describe()
    assert "Traceback" not in run.stdout + run.stderr
    assert (
        f"state store: the state store at {_shown(world.state_url)} has no windowpipe schema; "
        f"run `windowpipe migrate`"
    ) in run.stdout.splitlines()
    assert world.snapshot() == before, run.describe()


@BACKENDS
def test_migrate_creates_the_schema_once_and_then_the_read_commands_work(
    tmp_path: Path, world: StateWorld
) -> None:
    config = _config(tmp_path, world)
    shown = _shown(world.state_url)

    first = run_windowpipe("migrate", cwd=config.parent, config=config)
    assert first.returncode == 0, first.describe()
    assert first.stdout == (
        f"the state store at {shown} had no windowpipe schema; migrated to revision {HEAD}\n"
    )
    assert first.stderr == ""
    assert "windows" in world.snapshot()["tables"]

    again = run_windowpipe("migrate", cwd=config.parent, config=config)
    assert again.returncode == 0, again.describe()
    assert again.stdout == (
        f"the state store at {shown} is at schema revision {HEAD}, the newest: nothing to do\n"
    )

    migrated = world.snapshot()
    for command, args in READ_COMMANDS.items():
        run = run_windowpipe(*args, cwd=config.parent, config=config)
        assert run.returncode == 0, (command, run.describe())
        assert run.stderr == "", (command, run.describe())
    # Nothing to repair or release in an empty store: the read commands left it as migrated.
    assert world.snapshot()["tables"] == migrated["tables"]


@BACKENDS
def test_a_store_at_an_older_revision_is_refused_by_reads_and_upgraded_by_migrate(
    tmp_path: Path, world: StateWorld
) -> None:
    assert BASE != HEAD, "needs a second migration to have an older revision to test"
    _migrate_only_to(world.state_url, BASE)
    config = _config(tmp_path, world)
    shown = _shown(world.state_url)
    before = world.snapshot()
    for command, args in READ_COMMANDS.items():
        run = run_windowpipe(*args, cwd=config.parent, config=config)
        line = assert_one_error_line(run, 2)
        assert line == (
            f"windowpipe: error: the state store at {shown} is at schema revision {BASE}, this "
            f"windowpipe needs {HEAD}; run `windowpipe migrate`"
        ), command
    assert world.snapshot() == before
    run = run_windowpipe("migrate", cwd=config.parent, config=config)
    assert run.returncode == 0, run.describe()
    assert run.stdout == (
        f"the state store at {shown} was at schema revision {BASE}; migrated to revision {HEAD}\n"
    )
    status = run_windowpipe("status", "--json", cwd=config.parent, config=config)
    assert status.returncode == 0, status.describe()


@BACKENDS
def test_a_store_at_a_revision_this_windowpipe_does_not_know_is_refused_not_migrated(
    tmp_path: Path, world: StateWorld
) -> None:
    with StateStore(world.state_url) as store:
        store.migrate()
        with store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff'"))
    config = _config(tmp_path, world)
    before = world.snapshot()
    status = run_windowpipe("status", cwd=config.parent, config=config)
    assert_one_error_line(
        status,
        2,
        "is at schema revision ffff, which this windowpipe does not know (was it migrated by a "
        f"newer windowpipe?); this windowpipe needs {HEAD}",
    )
    migrate = run_windowpipe("migrate", cwd=config.parent, config=config)
    assert_one_error_line(migrate, 1, "cannot migrate the state store at")
    assert world.snapshot() == before


@BACKENDS
def test_enqueue_writes_so_it_migrates_a_store_without_the_schema(
    tmp_path: Path, world: StateWorld
) -> None:
    config = _config(tmp_path, world)
    run = run_windowpipe(
        *("enqueue", "orders", "--start", "2026-11-01T00:00:00Z", "--end", "2026-11-01T01:00:00Z"),
        cwd=config.parent,
        config=config,
    )
    assert run.returncode == 0, run.describe()
    assert run.stdout.startswith("orders: 4 window(s) in range, 4 created"), run.describe()
    assert len(world.snapshot()["tables"]["windows"]) == 4


@BACKENDS
def test_schema_revision_reads_without_creating_anything(world: StateWorld) -> None:
    store = StateStore(world.state_url)
    try:
        before = world.snapshot()
        assert store.schema_revision() == (None, HEAD)
        assert world.snapshot() == before
        store.migrate()
        assert store.schema_revision() == (HEAD, HEAD)
    finally:
        store.dispose()
