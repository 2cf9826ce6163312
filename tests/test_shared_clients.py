"""Process-wide clients (connectors.shared): connectors of many pipelines that connect to the
same place share one client, and the last one to let go closes it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from connectors import shared
from connectors.registry import close_all, connector_for, forget_all
from connectors.sql import SqlSource
from core.config import config_from_dict


class Client:
    def __init__(self, name: str) -> None:
        self.name = name
        self.closed = 0


def close(client: Client) -> None:
    client.closed += 1


@pytest.fixture(autouse=True)
def no_clients_left() -> Iterator[None]:
    shared.forget_all()
    yield
    shared.close_all()


def test_leases_of_one_key_share_a_client_built_once() -> None:
    built: list[Client] = []

    def build() -> Client:
        built.append(Client("a"))
        return built[-1]

    first, second = shared.lease("a", build, close), shared.lease("a", build, close)

    assert first.client is second.client
    assert len(built) == 1
    assert shared.lease("b", lambda: Client("b"), close).client.name == "b"


def test_the_last_release_closes_the_client_and_a_new_lease_builds_another() -> None:
    first = shared.lease("a", lambda: Client("a"), close)
    second = shared.lease("a", lambda: Client("a"), close)
    client = first.client

    first.release()
    first.release()  # a second release of one lease counts once
    assert client.closed == 0
    second.release()
    assert client.closed == 1

    again = shared.lease("a", lambda: Client("a"), close)
    assert again.client is not client


def test_forget_drops_clients_without_closing_them_and_old_leases_stay_inert() -> None:
    old = shared.lease("a", lambda: Client("a"), close)
    client = old.client

    shared.forget_all()
    fresh = shared.lease("a", lambda: Client("a"), close)
    old.release()

    assert client.closed == 0
    assert fresh.client is not client
    assert fresh.client.closed == 0


def test_close_all_closes_every_client_once() -> None:
    leases = [shared.lease(key, lambda k=key: Client(k), close) for key in ("a", "a", "b")]

    shared.close_all()
    for held in leases:
        held.release()

    assert [held.client.closed for held in leases] == [1, 1, 1]
    assert shared.shared_count() == 0


def test_a_failed_build_leaves_nothing_behind() -> None:
    def broken() -> Client:
        raise ValueError("bad host")

    with pytest.raises(ValueError):
        shared.lease("a", broken, close)
    assert shared.shared_count() == 0


def _pipelines(tmp_path: Path, count: int, url: str) -> dict[str, object]:
    return {
        f"p{index}": {
            "window": "1h",
            "start": "2026-01-01T00:00:00Z",
            "source": {"type": "sql", "url": url, "table": f"src_{index}"},
            "staging": {"type": "local", "path": str(tmp_path / "staging")},
            "target": {"type": "sql", "url": url, "table": f"dst_{index}"},
        }
        for index in range(count)
    }


def test_sql_connectors_of_many_pipelines_share_one_engine_per_role_and_url(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path}/data.db"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for index in range(3):
            conn.exec_driver_sql(
                f"CREATE TABLE src_{index} (id INTEGER PRIMARY KEY, created_at DATETIME)"
            )
    engine.dispose()
    config = config_from_dict({"pipelines": _pipelines(tmp_path, 3, url)})
    try:
        sources = [connector_for("source", config.pipeline(f"p{index}")) for index in range(3)]
        targets = [connector_for("target", config.pipeline(f"p{index}")) for index in range(3)]
        source_engines = {id(source._connect()[0]) for source in sources}  # type: ignore[attr-defined]
        target_engines = {id(target._connect()[0]) for target in targets}  # type: ignore[attr-defined]

        assert len(source_engines) == 1
        assert len(target_engines) == 1
        assert source_engines != target_engines  # a source's and a target's hooks differ
        assert shared.shared_count() == 2
    finally:
        close_all()
    assert shared.shared_count() == 0
    forget_all()


def test_a_source_closed_alone_disposes_its_engine(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/data.db"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE events (id INTEGER PRIMARY KEY, created_at DATETIME)")
    engine.dispose()
    config = config_from_dict({"pipelines": _pipelines(tmp_path, 1, url)}).pipeline("p0")
    source = SqlSource(config.source.model_copy(update={"table": "events"}))  # type: ignore[arg-type]

    source._connect()
    assert shared.shared_count() == 1
    source.close()
    assert shared.shared_count() == 0
