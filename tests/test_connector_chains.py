"""The whole chain with the systems' own client libraries, stage by stage through the runner:

- Elasticsearch (elasticsearch-py on osmem) -> S3 (boto3 on moto) -> PostgreSQL (`sql` target)
- OpenSearch (opensearch-py on osmem) -> local staging -> Snowflake (snowflake-connector on
  fakesnow, through an external `file://` stage over the local staging)

Source, staged and target counts must agree for every window, and the target must hold each
source document exactly once.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import snowflake.connector
import sqlalchemy as sa
from moto.server import ThreadedMotoServer
from opensearchpy import OpenSearch, helpers
from osmem_server import OsmemServer

from connectors.elasticsearch import ElasticsearchSource
from connectors.registry import build
from core.config import Config, PipelineConfig, config_from_dict
from core.instants import format_instant
from core.records import STAGE_ORDER, WindowStatus
from core.runner import Runtime, run_stage
from core.store import StateStore
from core.windows import windows_in_range
from tests.conftest import REDIS_TEST_URL
from tests.support.deployment import free_redis_db, release_redis_db
from tests.support.osmem import OsmemCompatibleNode
from windowpipe.demo.fakesnow import teach_fakesnow_metadata_copy

pytestmark = pytest.mark.integration

ORIGIN = datetime(2026, 11, 1, tzinfo=UTC)
HOURS = 6
EMPTY_HOUR = 3


@pytest.fixture(scope="module")
def osmem_events() -> Iterator[tuple[str, Counter[str]]]:
    """An osmem server with an `events` index: a few documents per hour, one empty hour, and
    documents exactly on hour boundaries."""
    server = OsmemServer.start(addr="127.0.0.1:0")
    client = OpenSearch([server.url])
    client.indices.create(
        index="events", body={"mappings": {"properties": {"@timestamp": {"type": "date"}}}}
    )
    actions = []
    for hour in range(HOURS):
        if hour == EMPTY_HOUR:
            continue
        for n in range(40 + hour):
            at = ORIGIN + timedelta(hours=hour, seconds=0 if n == 0 else 79 * n)
            doc_id = f"h{hour}-{n}"
            actions.append(
                {
                    "_index": "events",
                    "_id": doc_id,
                    "_source": {"@timestamp": format_instant(at), "n": n, "note": "naïve ✓"},
                }
            )
    helpers.bulk(client, actions, refresh=True)
    yield server.url, Counter(action["_id"] for action in actions)
    client.close()
    server.close()


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    number = free_redis_db(REDIS_TEST_URL)
    client = redis.Redis.from_url(f"{REDIS_TEST_URL}/{number}")
    client.flushdb()
    yield client
    client.flushdb()
    release_redis_db(REDIS_TEST_URL, number)


def run_all_windows(config: Config, store: StateStore, client: redis.Redis, factory: Any) -> None:
    pipeline = config.pipelines["events"]
    windows = windows_in_range(
        origin=pipeline.start,
        size=pipeline.window,
        start=ORIGIN,
        end=ORIGIN + timedelta(hours=HOURS),
    )
    store.create_windows("events", windows)
    runtime = Runtime(config, store, client, factory)
    for window in windows:
        assert store.queue("events", window.start, expect=[WindowStatus.PENDING])
        for stage in STAGE_ORDER:
            record = store.get("events", window.start)
            assert record is not None
            if record.status not in (WindowStatus.QUEUED, WindowStatus.RUNNING):
                break
            run_stage(runtime, stage, "events", window.start)


def assert_every_window_agrees(store: StateStore) -> None:
    records = store.list_records("events")
    assert len(records) == HOURS
    for index, record in enumerate(records):
        if index == EMPTY_HOUR:
            assert record.status == WindowStatus.SKIPPED, record
        else:
            assert record.status == WindowStatus.SUCCEEDED, record
            assert record.source_count == record.staged_count == record.target_count == 40 + index


def events_config(
    tmp_path: Path, *, source: dict[str, Any], staging: dict[str, Any], target: dict[str, Any]
) -> Config:
    """The `events` pipeline of hourly windows from ORIGIN, with these connectors."""
    return config_from_dict(
        {
            "windowpipe": {"state_url": f"sqlite:///{tmp_path}/state.db"},
            "pipelines": {
                "events": {
                    "window": "1h",
                    "start": format_instant(ORIGIN),
                    "source": source,
                    "staging": staging,
                    "target": target,
                }
            },
        }
    )


def connector_factory(overrides: dict[str, Any]) -> Any:
    cache: dict[str, Any] = {}

    def factory(role: str, pipeline: PipelineConfig) -> Any:
        if role not in cache:
            cache[role] = overrides[role](pipeline) if role in overrides else build(role, pipeline)  # type: ignore[arg-type]
        return cache[role]

    return factory


def test_elasticsearch_to_s3_to_postgresql(
    osmem_events: tuple[str, Counter[str]],
    pg_schema_url: str,
    redis_client: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    osmem_url, source_ids = osmem_events
    monkeypatch.setenv("WP_S3_KEY", "testing")
    monkeypatch.setenv("WP_S3_SECRET", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="pipeline-stage")
        config = events_config(
            tmp_path,
            source={
                "type": "elasticsearch",
                "hosts": [osmem_url],
                "index": "events",
                "page_size": 7,
            },
            staging={
                "type": "s3",
                "bucket": "pipeline-stage",
                "prefix": "raw/",
                "endpoint_url": endpoint,
                "region": "us-east-1",
                "access_key_id_env": "WP_S3_KEY",
                "secret_access_key_env": "WP_S3_SECRET",
                "max_file_bytes": 2048,
            },
            target={"type": "sql", "url": pg_schema_url, "table": "events_loaded"},
        )
        store = StateStore(config.settings.state_url)
        store.migrate()
        factory = connector_factory(
            {"source": lambda p: ElasticsearchSource(p.source, node_class=OsmemCompatibleNode)}
        )
        run_all_windows(config, store, redis_client, factory)
        assert_every_window_agrees(store)
        # Several part files per window went through S3 (max_file_bytes is small).
        manifest = store.list_records("events")[0].manifest
        assert manifest and manifest.startswith("events/2026/11/01/")
    finally:
        server.stop()
    engine = sa.create_engine(pg_schema_url)
    with engine.connect() as conn:
        loaded = Counter(r[0] for r in conn.execute(sa.text("SELECT doc_id FROM events_loaded")))
    engine.dispose()
    assert loaded == source_ids
    store.dispose()


def test_opensearch_to_local_staging_to_snowflake(
    osmem_events: tuple[str, Counter[str]],
    redis_client: redis.Redis,
    fakesnow_server: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    osmem_url, source_ids = osmem_events
    staging_dir = tmp_path / "staging"
    staging_dir.mkdir()
    teach_fakesnow_metadata_copy(staging_dir)
    database = f"WP_{uuid.uuid4().hex[:8].upper()}"
    kwargs = fakesnow_server
    monkeypatch.setenv("WP_SF_PASSWORD", kwargs["password"])
    plain = {k: v for k, v in kwargs.items() if k != "session_parameters"}
    admin = snowflake.connector.connect(**plain, database=database, schema="EVENTS")
    admin.cursor().execute(
        f"CREATE STAGE {database}.EVENTS.EVENTS_STAGE URL='file://{staging_dir}/'"
    )
    config = events_config(
        tmp_path,
        source={"type": "opensearch", "hosts": [osmem_url], "index": "events", "page_size": 9},
        staging={"type": "local", "path": str(staging_dir)},
        target={
            "type": "snowflake",
            "account": kwargs["account"],
            "user": kwargs["user"],
            "password_env": "WP_SF_PASSWORD",
            "database": database,
            "schema": "EVENTS",
            "table": "EVENTS",
            "stage": "EVENTS_STAGE",
            "host": kwargs["host"],
            "port": kwargs["port"],
            "protocol": kwargs["protocol"],
        },
    )
    store = StateStore(config.settings.state_url)
    store.migrate()
    factory = connector_factory({})
    run_all_windows(config, store, redis_client, factory)
    assert_every_window_agrees(store)
    cursor = admin.cursor()
    cursor.execute(f"SELECT DOC_ID FROM {database}.EVENTS.EVENTS")
    loaded = Counter(row[0] for row in cursor.fetchall())
    factory("target", config.pipelines["events"]).close()
    admin.close()
    assert loaded == source_ids
    store.dispose()
