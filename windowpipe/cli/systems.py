"""Reaching the systems a command needs: the state store (read, or migrated for a write), Redis,
the broker and result backend, and the Celery app that sends chains.

Read commands never change the state store's schema: a store without the newest schema is
refused in one line, exit 2, and left as it was. A system that does not answer is exit 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from core.config import Config
from core.errors import WindowpipeError, first_line
from windowpipe.cli.options import fail, guarded

if TYPE_CHECKING:
    from core.store import StateStore

CONNECT_TIMEOUT_SECONDS = 5.0
"""How long a command waits for Redis or the broker to answer before calling it unreachable."""

T = TypeVar("T")


def shown(url: str) -> str:
    """A URL fit for a message: its password masked."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<the configured URL>"


class StoreUnreachableError(WindowpipeError):
    """The state store's database did not answer (or could not be opened): a failed run."""


def reaching_store(store: StateStore, call: Callable[[], T]) -> T:
    """`call()` on the state store; a database that cannot be reached is StoreUnreachableError."""
    from sqlalchemy.exc import DBAPIError

    try:
        return call()
    except DBAPIError as error:
        reason = first_line(error.orig or error)
        raise StoreUnreachableError(
            f"cannot reach the state store at {shown(store.url)}: {reason}"
        ) from None


def open_store(config: Config) -> StateStore:
    """The state store, opened without touching its schema."""
    from core.store import StateStore

    return guarded(lambda: StateStore(config.settings.state_url))


def schema_problem(store: StateStore) -> str | None:
    """Why the state store cannot be read by this windowpipe yet, or None; runs no DDL."""
    current, head = reaching_store(store, store.schema_revision)
    if current == head:
        return None
    where = f"the state store at {shown(store.url)}"
    if current is None:
        return f"{where} has no windowpipe schema; run `windowpipe migrate`"
    if not _known_revision(current):
        return (
            f"{where} is at schema revision {current}, which this windowpipe does not know "
            f"(was it migrated by a newer windowpipe?); this windowpipe needs {head}"
        )
    return (
        f"{where} is at schema revision {current}, this windowpipe needs {head}; "
        f"run `windowpipe migrate`"
    )


def _known_revision(revision: str) -> bool:
    """True when `revision` is one of the migrations this windowpipe ships."""
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    from core.store import MIGRATIONS_DIR

    try:
        return ScriptDirectory(str(MIGRATIONS_DIR)).get_revision(revision) is not None
    except CommandError:
        return False


def read_store(config: Config) -> StateStore:
    """The state store for a command that reads it (or repairs records): never runs DDL; a
    database without the newest schema is refused in one line, exit 2, and left as it was."""
    store = open_store(config)
    problem = schema_problem(store)
    if problem:
        store.dispose()
        fail(problem, 2)
    return store


def write_store(config: Config) -> StateStore:
    """The state store for a command that writes windows: migrated to the newest schema."""
    store = open_store(config)
    reaching_store(store, store.migrate)
    return store


def _systems_to_ping(config: Config) -> list[tuple[str, str]]:
    """(what, URL) of every message system a command that sends work must reach first."""
    settings = config.settings
    named = [
        ("redis", settings.redis_url),
        ("broker", settings.broker_url),
        ("result backend", settings.result_backend_url),
    ]
    seen: set[str] = set()
    systems = []
    for what, url in named:
        if url and url not in seen:
            seen.add(url)
            systems.append((what, url))
    return systems


def _ping(url: str) -> None:
    """Connect to a Redis or AMQP URL and check it answers; raises on failure."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        import redis

        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT_SECONDS,
            socket_timeout=CONNECT_TIMEOUT_SECONDS,
        )
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=CONNECT_TIMEOUT_SECONDS) as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0)


def unreachable(config: Config) -> list[str]:
    """One line per message system (Redis, broker, result backend) that does not answer."""
    problems = []
    for what, url in _systems_to_ping(config):
        try:
            _ping(url)
        except Exception as error:
            problems.append(f"{what} at {shown(url)} is unreachable: {first_line(error)}")
    return problems


def redis_client(config: Config) -> Any:
    """A client of `redis_url` that answered a ping; an unreachable Redis is exit 1."""
    import redis

    url = config.settings.redis_url
    client = redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        client.ping()
    except redis.RedisError as error:
        fail(f"redis at {shown(url)} is unreachable: {first_line(error)}", 1)
    return client


def chain_sender(config: Config) -> Callable[..., str]:
    """`send_chain` of a Celery app built from the command's own config (loaded once)."""
    from workers.celery_app import create_app
    from workers.runtime import send_chain

    create_app(config)
    return send_chain
