"""The retry budget (core/retry.py): one layer per kind of retry, counted exactly, and a soft
time limit that is always a transient failure of the attempt, never terminal, never retried
inside the step.

- unit tables: `worst_case`, `stage_policy`, `call_with_retries`, `as_time_limit`, and every
  connector's error translation;
- the real SDKs against a server that answers 503 (or never answers): one request per call,
  and a soft time limit delivered the way Celery's pool delivers it (SIGUSR1, billiard's
  handler) in the middle of a real request comes out as `StageTimeLimitError`;
- real Celery workers running the precheck of one window against a search engine that always
  answers 503, until the window is dead: the calls it received equal the documented bound.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog
import structlog.testing
from billiard.exceptions import SoftTimeLimitExceeded

from core.config import (
    ElasticsearchSourceConfig,
    LocalStagingConfig,
    OpenSearchSourceConfig,
    S3StagingConfig,
    SnowflakeTargetConfig,
    SqlSourceConfig,
    config_from_dict,
)
from core.errors import (
    ConfigError,
    StageTimeLimitError,
    TerminalError,
    TransientError,
    WindowpipeError,
)
from core.instants import format_instant
from core.records import Stage, WindowStatus
from core.retry import (
    STAGE_POLICIES,
    StagePolicy,
    WorstCase,
    as_time_limit,
    call_with_retries,
    stage_policy,
    time_limit_cause,
    worst_case,
)
from core.windows import Window
from tests.support.deployment import Deployment, write_config

REPO = Path(__file__).resolve().parent.parent
ORIGIN = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = Window(ORIGIN, ORIGIN + timedelta(minutes=15))


# --- helpers -------------------------------------------------------------------------------------


def wrapped(outer: Callable[[BaseException], BaseException]) -> BaseException:
    """`outer(limit)` raised while a soft time limit propagates: the way the SDKs wrap
    whatever a request raised (`raise TheirError(...)` inside `except Exception`)."""
    try:
        try:
            raise SoftTimeLimitExceeded()
        except SoftTimeLimitExceeded as limit:
            raise outer(limit)  # noqa: B904 - the SDKs chain implicitly, as here
    except BaseException as error:
        return error


@contextmanager
def soft_time_limit_after(seconds: float) -> Iterator[None]:
    """Deliver a soft time limit as Celery's prefork pool does: SIGUSR1 to this process, whose
    handler (billiard's own) raises SoftTimeLimitExceeded in the main thread, wherever it is."""
    from billiard.pool import soft_timeout_sighandler

    previous = signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGUSR1, previous)


class CountingServer:
    """An HTTP server that counts the requests it receives and answers each with `status` and
    `body` (`X-Elastic-Product: Elasticsearch` included, so elasticsearch-py accepts it), or,
    with `hang`, never answers at all."""

    def __init__(
        self,
        status: int = 503,
        body: bytes = b'{"error":{"type":"unavailable","reason":"down"},"status":503}',
        content_type: str = "application/json",
        hang: bool = False,
    ) -> None:
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                with server._lock:
                    server.requests.append((self.command, self.path.split("?")[0]))
                if hang:
                    server._release.wait()
                    return
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("X-Elastic-Product", "Elasticsearch")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> CountingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)


S3_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>down</Message></Error>"
)


# --- the worst case: a table --------------------------------------------------------------------

PRECHECK = STAGE_POLICIES[Stage.PRECHECK]
EXTRACT = STAGE_POLICIES[Stage.EXTRACT]
FIVE_MINUTES = timedelta(minutes=5)
# Default step waits: ceilings 0.5 s and 1 s (3 tries); default countdowns: 2 + 4 + 8 + 16 s;
# default failed-window delays after attempts 1-4: 30 + 60 + 120 + 240 s, each plus a 5 m tick.
DEFAULT_BETWEEN = 30 + 60 + 120 + 240 + 4 * 300


@pytest.mark.parametrize(
    ("policy", "max_attempts", "failed_retry_base", "every", "expected"),
    [
        pytest.param(
            PRECHECK,
            5,
            timedelta(seconds=30),
            FIVE_MINUTES,
            WorstCase(
                calls=75,
                runs=25,
                waiting_seconds=5 * (5 * 1.5 + 30) + DEFAULT_BETWEEN,
                seconds=5 * (5 * 300 + 30) + DEFAULT_BETWEEN,
            ),
            id="precheck defaults",
        ),
        pytest.param(
            EXTRACT,
            5,
            timedelta(seconds=30),
            FIVE_MINUTES,
            WorstCase(
                calls=75,
                runs=25,
                waiting_seconds=5 * (5 * 1.5 + 30) + DEFAULT_BETWEEN,
                seconds=5 * (5 * 3600 + 30) + DEFAULT_BETWEEN,
            ),
            id="extract defaults: same calls, longer soft limit",
        ),
        pytest.param(
            StagePolicy(soft_time_limit=10, time_limit=20, step_attempts=1, task_retries=0),
            1,
            timedelta(seconds=30),
            FIVE_MINUTES,
            WorstCase(calls=1, runs=1, waiting_seconds=0, seconds=10),
            id="no retries at all: one call, no waits, no delay after the last attempt",
        ),
        pytest.param(
            StagePolicy(
                soft_time_limit=10,
                time_limit=20,
                step_attempts=2,
                step_backoff=0,
                task_retries=2,
                backoff_base=0,
            ),
            3,
            timedelta(0),
            FIVE_MINUTES,
            WorstCase(calls=18, runs=9, waiting_seconds=0, seconds=90),
            id="zero backoffs and failed_retry_base 0: no waits, no tick between attempts",
        ),
        pytest.param(
            StagePolicy(
                soft_time_limit=10,
                time_limit=20,
                step_attempts=4,
                step_backoff=1.5,
                task_retries=4,
                backoff_base=100,
            ),
            1,
            timedelta(seconds=30),
            FIVE_MINUTES,
            # step waits capped at 2 s: 1.5 + 2 + 2; countdowns capped at 120 s: 100 + 3 * 120
            WorstCase(calls=20, runs=5, waiting_seconds=5 * 5.5 + 460, seconds=5 * 10 + 460),
            id="step waits and countdowns stop at their caps",
        ),
        pytest.param(
            StagePolicy(soft_time_limit=10, time_limit=20, step_attempts=1, task_retries=0),
            10,
            timedelta(seconds=30),
            timedelta(minutes=1),
            # delays 30 * 2^(a-1) for attempts 1..9, capped at 1 h; plus a 1 m tick each
            WorstCase(
                calls=10,
                runs=10,
                waiting_seconds=30 + 60 + 120 + 240 + 480 + 960 + 1920 + 3600 + 3600 + 9 * 60,
                seconds=10 * 10 + 30 + 60 + 120 + 240 + 480 + 960 + 1920 + 3600 + 3600 + 9 * 60,
            ),
            id="failed-window delays double up to one hour",
        ),
    ],
)
def test_worst_case_counts_every_layer_once(
    policy: StagePolicy,
    max_attempts: int,
    failed_retry_base: timedelta,
    every: timedelta,
    expected: WorstCase,
) -> None:
    found = worst_case(
        policy, max_attempts=max_attempts, failed_retry_base=failed_retry_base, dispatch_every=every
    )
    assert found == expected


def _human(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds:,.0f} s ({seconds / 60:.0f} min)"
    return f"{seconds:,.0f} s ({seconds / 3600:.1f} h)"


def default_worst_case_rows() -> list[str]:
    """The README's worst-case table rows, computed from the defaults."""
    pipeline = _pipeline_config({})
    settings = config_from_dict({"pipelines": {}}).settings
    rows = []
    for stage in Stage:
        case = worst_case(
            stage_policy(stage, pipeline),
            max_attempts=pipeline.max_attempts,
            failed_retry_base=settings.failed_retry_base,
            dispatch_every=pipeline.every,
        )
        rows.append(
            f"| {stage.value} | {case.calls} | {case.runs} | {_human(case.waiting_seconds)} "
            f"| {_human(case.seconds)} |"
        )
    return rows


def test_readme_states_the_worst_case_the_function_computes_for_the_defaults() -> None:
    readme = (REPO / "README.md").read_text()
    for row in default_worst_case_rows():
        assert row in readme, f"README's Retries section should have the row\n{row}"


# --- the policy from the config -----------------------------------------------------------------


def _pipeline_config(retry_keys: dict[str, Any]) -> Any:
    raw = {
        "pipelines": {
            "p": {
                "window": "15m",
                "start": format_instant(ORIGIN),
                **retry_keys,
                "source": {"type": "elasticsearch", "hosts": ["http://127.0.0.1:9"], "index": "i"},
                "staging": {"type": "local", "path": "/tmp/unused-staging"},
                "target": {"type": "sql", "url": "sqlite:///unused.db", "table": "t"},
            }
        }
    }
    return config_from_dict(raw, require_secrets=False).pipeline("p")


def test_a_pipeline_sets_its_retry_keys_and_keeps_the_stage_time_limits() -> None:
    pipeline = _pipeline_config(
        {"step_attempts": 2, "step_backoff": 0, "task_retries": 1, "task_backoff": 0.25}
    )
    for stage in Stage:
        policy = stage_policy(stage, pipeline)
        default = STAGE_POLICIES[stage]
        assert (policy.step_attempts, policy.step_backoff) == (2, 0)
        assert (policy.task_retries, policy.backoff_base) == (1, 0.25)
        assert (policy.soft_time_limit, policy.time_limit) == (
            default.soft_time_limit,
            default.time_limit,
        )
        assert (policy.step_wait_max, policy.backoff_cap) == (
            default.step_wait_max,
            default.backoff_cap,
        )


def test_a_pipeline_without_retry_keys_runs_the_stage_defaults() -> None:
    pipeline = _pipeline_config({})
    for stage in Stage:
        assert stage_policy(stage, pipeline) == STAGE_POLICIES[stage]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("step_attempts", 0),
        ("task_retries", -1),
        ("step_backoff", 3),
        ("task_backoff", -0.5),
        ("task_retries", "four"),
    ],
)
def test_a_bad_retry_key_is_refused_in_one_line(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as refused:
        _pipeline_config({key: value})
    message = str(refused.value)
    assert f"pipelines.p.{key}" in message and "\n" not in message


# --- call_with_retries ----------------------------------------------------------------------------

QUICK = StagePolicy(soft_time_limit=10, time_limit=20, step_attempts=3, step_backoff=0)


def _always(error: BaseException) -> tuple[list[int], Callable[[], None]]:
    calls: list[int] = []

    def call() -> None:
        calls.append(1)
        raise error

    return calls, call


@pytest.mark.parametrize(
    ("error", "tries"),
    [
        (TransientError("connection reset"), 3),
        (TerminalError("no such index"), 1),
        (StageTimeLimitError("soft time limit"), 1),
        (SoftTimeLimitExceeded(), 1),
        (ValueError("a bug"), 1),
    ],
    ids=["transient", "terminal", "time limit", "raw time limit", "bug"],
)
def test_only_transient_errors_are_tried_again_within_the_step(
    error: BaseException, tries: int
) -> None:
    calls, call = _always(error)
    with pytest.raises(type(error)) as raised:
        call_with_retries(QUICK, call)
    assert raised.value is error  # propagated unchanged, never swallowed or wrapped
    assert len(calls) == tries


def test_a_call_that_recovers_returns_its_value_after_the_failed_tries() -> None:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError("blip")
        return "counted"

    assert call_with_retries(QUICK, call) == "counted"
    assert len(calls) == 3


def test_each_failed_try_is_logged_once_with_its_number_and_wait() -> None:
    # The first try runs outside tenacity; its failure must still count as tenacity's first.
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TransientError(f"blip {len(calls)}")
        return "counted"

    with structlog.testing.capture_logs() as logged:
        assert call_with_retries(QUICK, call) == "counted"
    retries = [e for e in logged if e["event"] == "transient error, retrying"]
    assert [(e["attempt"], e["error"], e["wait"]) for e in retries] == [
        (1, "blip 1", 0.0),
        (2, "blip 2", 0.0),
    ]


def test_a_call_that_succeeds_at_once_is_called_once_and_logs_nothing() -> None:
    calls: list[int] = []
    with structlog.testing.capture_logs() as logged:
        assert call_with_retries(QUICK, lambda: calls.append(1) or "first") == "first"
    assert calls == [1]
    assert logged == []


def test_a_soft_time_limit_during_the_wait_between_tries_ends_the_step() -> None:
    waits_long = StagePolicy(
        soft_time_limit=10, time_limit=20, step_attempts=3, step_backoff=60, step_wait_max=60
    )
    calls, call = _always(TransientError("connection reset"))
    with soft_time_limit_after(0.3), pytest.raises(SoftTimeLimitExceeded):
        call_with_retries(waits_long, call)
    assert len(calls) == 1


# --- time limits inside SDK errors: the translation tables ----------------------------------------


def test_time_limit_cause_finds_the_limit_however_deep_it_was_wrapped() -> None:
    twice = wrapped(lambda limit: RuntimeError(f"outer of {limit!r}"))
    try:
        try:
            raise twice
        except RuntimeError as inner:
            raise OSError("outermost") from inner
    except OSError as error:
        deep = error
    assert isinstance(time_limit_cause(deep), SoftTimeLimitExceeded)
    assert time_limit_cause(ValueError("no limit here")) is None
    own = StageTimeLimitError("already ours")
    assert as_time_limit(own, "x") is own


def _es_api_error(status: int) -> Exception:
    from elastic_transport import ApiResponseMeta, HttpHeaders, NodeConfig
    from elasticsearch import ApiError

    meta = ApiResponseMeta(
        status=status,
        http_version="1.1",
        headers=HttpHeaders(),
        duration=0.0,
        node=NodeConfig("http", "127.0.0.1", 9200),
    )
    return ApiError("error", meta=meta, body={"error": {"reason": "because"}})


def _es_cases() -> list[tuple[str, Callable[[], Exception], type[WindowpipeError] | None]]:
    from elastic_transport import ConnectionError, ConnectionTimeout

    return [
        ("raw soft time limit", SoftTimeLimitExceeded, StageTimeLimitError),
        (
            "time limit wrapped as ConnectionError",
            lambda: wrapped(lambda e: ConnectionError(str(e), errors=(e,))),  # type: ignore[arg-type,return-value]
            StageTimeLimitError,
        ),
        ("connection refused", lambda: ConnectionError("refused"), TransientError),
        ("timeout", lambda: ConnectionTimeout("timed out"), TransientError),
        ("HTTP 503", lambda: _es_api_error(503), TransientError),
        ("HTTP 429", lambda: _es_api_error(429), TransientError),
        ("HTTP 404", lambda: _es_api_error(404), TerminalError),
        ("HTTP 401", lambda: _es_api_error(401), TerminalError),
        ("not the SDK's", lambda: ValueError("a bug"), None),
    ]


@pytest.mark.parametrize(("case", "make", "expected"), _es_cases(), ids=lambda v: str(v))
def test_elasticsearch_translation_makes_a_time_limit_transient_never_terminal(
    case: str, make: Callable[[], Exception], expected: type[WindowpipeError] | None
) -> None:
    from connectors.elasticsearch import ElasticsearchAdapter

    adapter = ElasticsearchAdapter(
        ElasticsearchSourceConfig(type="elasticsearch", hosts=["http://127.0.0.1:9"], index="i")
    )
    translated = adapter.translate(make(), "count on i")
    assert (None if translated is None else type(translated)) is expected, case


def _opensearch_cases() -> list[tuple[str, Callable[[], Exception], type[WindowpipeError] | None]]:
    from opensearchpy.exceptions import ConnectionError, TransportError

    return [
        ("raw soft time limit", SoftTimeLimitExceeded, StageTimeLimitError),
        (
            "time limit wrapped as ConnectionError",
            lambda: wrapped(lambda e: ConnectionError("N/A", str(e), e)),  # type: ignore[return-value]
            StageTimeLimitError,
        ),
        ("connection refused", lambda: ConnectionError("N/A", "refused", None), TransientError),
        ("HTTP 503", lambda: TransportError(503, "unavailable", {}), TransientError),
        ("HTTP 404", lambda: TransportError(404, "index_not_found_exception", {}), TerminalError),
        ("not the SDK's", lambda: ValueError("a bug"), None),
    ]


@pytest.mark.parametrize(("case", "make", "expected"), _opensearch_cases(), ids=lambda v: str(v))
def test_opensearch_translation_makes_a_time_limit_transient_never_terminal(
    case: str, make: Callable[[], Exception], expected: type[WindowpipeError] | None
) -> None:
    from connectors.elasticsearch import OpenSearchAdapter

    adapter = OpenSearchAdapter(
        OpenSearchSourceConfig(type="opensearch", hosts=["http://127.0.0.1:9"], index="i")
    )
    translated = adapter.translate(make(), "count on i")
    assert (None if translated is None else type(translated)) is expected, case


def _s3_client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def _s3_cases() -> list[tuple[str, Callable[[], Exception], type[WindowpipeError] | None]]:
    from botocore.exceptions import EndpointConnectionError, HTTPClientError, NoCredentialsError

    return [
        ("raw soft time limit", SoftTimeLimitExceeded, StageTimeLimitError),
        (
            "time limit wrapped as HTTPClientError",
            lambda: wrapped(lambda e: HTTPClientError(error=e)),  # type: ignore[return-value]
            StageTimeLimitError,
        ),
        ("SlowDown 503", lambda: _s3_client_error("SlowDown", 503), TransientError),
        ("AccessDenied 403", lambda: _s3_client_error("AccessDenied", 403), TerminalError),
        (
            "endpoint unreachable",
            lambda: EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
            TransientError,
        ),
        ("no credentials", NoCredentialsError, TerminalError),
        ("not botocore's", lambda: ValueError("a bug"), None),
    ]


@pytest.mark.parametrize(("case", "make", "expected"), _s3_cases(), ids=lambda v: str(v))
def test_s3_translation_makes_a_time_limit_transient_never_terminal(
    case: str, make: Callable[[], Exception], expected: type[WindowpipeError] | None
) -> None:
    from connectors.s3 import translate_s3_error

    translated = translate_s3_error(make(), "read", "s3://stage/x")
    assert (None if translated is None else type(translated)) is expected, case


def _sql_cases() -> list[tuple[str, Callable[[], Exception], type[WindowpipeError]]]:
    def dbapi(kind: type[sa.exc.DBAPIError], orig: BaseException) -> Exception:
        return kind("SELECT 1", {}, orig)  # type: ignore[arg-type]

    class Refused(Exception):
        pass

    return [
        (
            "time limit behind a busy connection's OperationalError",
            lambda: wrapped(
                lambda e: dbapi(sa.exc.OperationalError, RuntimeError("another command"))
            ),  # type: ignore[return-value]
            StageTimeLimitError,
        ),
        (
            "connection refused",
            lambda: dbapi(sa.exc.OperationalError, Refused("connection refused")),
            TransientError,
        ),
        (
            "bad SQL",
            lambda: dbapi(sa.exc.ProgrammingError, Refused("syntax error")),
            TerminalError,
        ),
        ("pool timeout", lambda: sa.exc.TimeoutError("pool exhausted"), TransientError),
    ]


@pytest.mark.parametrize(("case", "make", "expected"), _sql_cases(), ids=lambda v: str(v))
def test_sql_translation_makes_a_time_limit_transient_never_terminal(
    case: str, make: Callable[[], Exception], expected: type[WindowpipeError]
) -> None:
    from connectors.sql import _translate
    from connectors.sql_target import _translate_target

    error = make()
    assert isinstance(error, sa.exc.SQLAlchemyError)
    assert type(_translate(error, "count")) is expected, case
    assert type(_translate_target(error, "load window")) is expected, case


def _snowflake_cases() -> list[tuple[str, Callable[[], Exception], type[WindowpipeError]]]:
    from snowflake.connector import errors

    return [
        ("raw soft time limit", SoftTimeLimitExceeded, StageTimeLimitError),
        (
            "time limit behind a connector error",
            lambda: wrapped(lambda e: errors.OperationalError(msg="x", errno=250003)),  # type: ignore[return-value]
            StageTimeLimitError,
        ),
        (
            "cannot connect",
            lambda: errors.OperationalError(msg="no", errno=250001),
            TransientError,
        ),
        ("bad password", lambda: errors.DatabaseError(msg="no", errno=390100), TerminalError),
        ("bad SQL", lambda: errors.ProgrammingError(msg="syntax", errno=1003), TerminalError),
        ("a bug", lambda: ValueError("a bug"), TerminalError),
    ]


@pytest.mark.parametrize(("case", "make", "expected"), _snowflake_cases(), ids=lambda v: str(v))
def test_snowflake_translation_makes_a_time_limit_transient_never_terminal(
    case: str, make: Callable[[], Exception], expected: type[WindowpipeError]
) -> None:
    from connectors.snowflake.client import translate

    assert type(translate(make(), "load window")) is expected, case


# --- the real SDKs: one request per call, and a soft time limit mid-request ---------------------


def test_elasticsearch_makes_one_request_per_call_against_a_503() -> None:
    from connectors.elasticsearch import ElasticsearchSource

    with CountingServer() as server:
        source = ElasticsearchSource(
            ElasticsearchSourceConfig(type="elasticsearch", hosts=[server.url], index="events")
        )
        with pytest.raises(TransientError, match="503"):
            source.count(WINDOW)
        source.close()
    assert server.requests == [("POST", "/events/_count")]


def test_elasticsearch_makes_one_request_per_call_when_the_server_times_out() -> None:
    from connectors.elasticsearch import ElasticsearchSource

    with CountingServer(hang=True) as server:
        source = ElasticsearchSource(
            ElasticsearchSourceConfig(
                type="elasticsearch", hosts=[server.url], index="events", request_timeout=0.5
            )
        )
        with pytest.raises(TransientError):
            source.count(WINDOW)
        source.close()
        assert server.count == 1


def test_opensearch_makes_one_request_per_call_against_a_503() -> None:
    from connectors.elasticsearch import OpenSearchSource

    with CountingServer() as server:
        source = OpenSearchSource(
            OpenSearchSourceConfig(type="opensearch", hosts=[server.url], index="events")
        )
        with pytest.raises(TransientError, match="503"):
            source.count(WINDOW)
        source.close()
    assert server.requests == [("POST", "/events/_count")]


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)


@pytest.mark.usefixtures("aws_env")
def test_s3_makes_one_request_per_call_against_a_slow_down() -> None:
    from connectors.s3 import S3Staging

    with CountingServer(body=S3_SLOW_DOWN, content_type="application/xml") as server:
        staging = S3Staging(
            S3StagingConfig(type="s3", bucket="stage", endpoint_url=server.url, region="us-east-1")
        )
        with pytest.raises(TransientError, match="SlowDown"):
            staging.read_manifest("p/manifest-r.json")
        staging.close()
    assert server.requests == [("GET", "/stage/p/manifest-r.json")]


def test_snowflake_login_is_tried_at_most_twice_by_the_connector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WP_TEST_SF_PASSWORD", "secret")
    from connectors.snowflake.client import connect

    with CountingServer() as server:
        config = SnowflakeTargetConfig.model_validate(
            {
                "type": "snowflake",
                "account": "a",
                "user": "u",
                "password_env": "WP_TEST_SF_PASSWORD",
                "database": "D",
                "schema": "S",
                "table": "T",
                "stage": "ST",
                "host": "127.0.0.1",
                "port": server.port,
                "protocol": "http",
            }
        )
        with pytest.raises(TransientError):
            connect(config)
    # What the README says remains of the connector's own retries: one more login.
    assert server.requests == [("POST", "/session/v1/login-request")] * 2


def test_a_soft_time_limit_inside_an_elasticsearch_request_is_a_stage_time_limit() -> None:
    from connectors.elasticsearch import ElasticsearchSource

    with CountingServer(hang=True) as server:
        source = ElasticsearchSource(
            ElasticsearchSourceConfig(type="elasticsearch", hosts=[server.url], index="events")
        )
        with soft_time_limit_after(0.5), pytest.raises(StageTimeLimitError):
            source.count(WINDOW)
        source.close()
        assert server.count == 1  # not retried by the SDK as the connection error it wrapped


def test_a_soft_time_limit_inside_an_opensearch_request_is_a_stage_time_limit() -> None:
    from connectors.elasticsearch import OpenSearchSource

    with CountingServer(hang=True) as server:
        source = OpenSearchSource(
            OpenSearchSourceConfig(type="opensearch", hosts=[server.url], index="events")
        )
        with soft_time_limit_after(0.5), pytest.raises(StageTimeLimitError):
            source.count(WINDOW)
        source.close()
        assert server.count == 1


@pytest.mark.usefixtures("aws_env")
def test_a_soft_time_limit_inside_an_s3_request_is_a_stage_time_limit() -> None:
    from connectors.s3 import S3Staging

    with CountingServer(hang=True) as server:
        staging = S3Staging(
            S3StagingConfig(type="s3", bucket="stage", endpoint_url=server.url, region="us-east-1")
        )
        # Build the boto3 client first: on a loaded machine building it can take longer than
        # the time limit, which would then fire before the request is sent.
        assert staging.client is not None
        with soft_time_limit_after(0.5), pytest.raises(StageTimeLimitError):
            staging.read_manifest("p/manifest-r.json")
        staging.close()
        assert server.count == 1


def test_a_soft_time_limit_inside_a_snowflake_login_is_a_stage_time_limit_not_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WP_TEST_SF_PASSWORD", "secret")
    from connectors.snowflake.client import connect

    with CountingServer(hang=True) as server:
        config = SnowflakeTargetConfig.model_validate(
            {
                "type": "snowflake",
                "account": "a",
                "user": "u",
                "password_env": "WP_TEST_SF_PASSWORD",
                "database": "D",
                "schema": "S",
                "table": "T",
                "stage": "ST",
                "host": "127.0.0.1",
                "port": server.port,
                "protocol": "http",
            }
        )
        with soft_time_limit_after(0.5), pytest.raises(StageTimeLimitError):
            connect(config)


@pytest.mark.integration
def test_a_soft_time_limit_inside_a_postgresql_query_is_a_stage_time_limit(
    pg_schema_url: str,
) -> None:
    from connectors.sql import SqlSource

    engine = sa.create_engine(pg_schema_url)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE events (id BIGINT PRIMARY KEY, created_at TIMESTAMPTZ)"))
    source = SqlSource(SqlSourceConfig(type="sql", url=pg_schema_url, table="events"))
    assert source.count(WINDOW) == 0  # reflected and connected: the next count only queries
    locker = engine.connect()
    try:
        locker.execute(sa.text("LOCK TABLE events IN ACCESS EXCLUSIVE MODE"))  # count waits
        with soft_time_limit_after(0.5), pytest.raises(StageTimeLimitError):
            source.count(WINDOW)
    finally:
        locker.rollback()
        locker.close()
        source.close()
        engine.dispose()


def test_a_soft_time_limit_while_the_local_staging_writes_passes_unchanged_and_leaves_no_file(
    tmp_path: Path,
) -> None:
    from connectors.base import Batch, Document
    from connectors.local import LocalStaging

    staging = LocalStaging(LocalStagingConfig(type="local", path=str(tmp_path / "staging")))

    def batches() -> Iterator[Batch]:
        yield Batch(documents=[Document(id="1", timestamp=ORIGIN, body={"a": 1})])
        time.sleep(60)  # the source is slow: the soft time limit arrives here
        yield Batch()

    with soft_time_limit_after(0.5), pytest.raises(SoftTimeLimitExceeded):
        staging.write_window("p", WINDOW, "f00000001", batches())
    assert staging.list_files("p", WINDOW) == []


# --- real workers: the precheck of one window against a source that is down -----------------------


@pytest.mark.integration
def test_a_window_whose_source_is_down_makes_exactly_the_documented_calls_then_is_dead(
    tmp_path: Path, redis_db: str
) -> None:
    budget = {"max_attempts": 3, "task_retries": 2, "step_attempts": 2}
    quick = {"step_backoff": 0, "task_backoff": 0}
    with CountingServer() as search_engine:
        config = write_config(
            tmp_path / "windowpipe.toml",
            {
                "redis_url": redis_db,
                "state_url": f"sqlite:///{tmp_path}/state.db",
                "lock_ttl": "10s",
                "stale_after": "1h",
                "failed_retry_base": "0s",
            },
            {
                "down": {
                    "window": "15m",
                    "start": format_instant(ORIGIN),
                    "every": "1h",
                    **budget,
                    **quick,
                    "source": {
                        "type": "elasticsearch",
                        "hosts": [search_engine.url],
                        "index": "events",
                    },
                    "staging": {"type": "local", "path": str(tmp_path / "staging")},
                    "target": {
                        "type": "sql",
                        "url": f"sqlite:///{tmp_path}/target.db",
                        "table": "events_loaded",
                    },
                }
            },
        )
        dep = Deployment(config_path=config, workdir=tmp_path)
        try:
            dep.start_workers(["precheck", "control"], concurrency=1)
            end = ORIGIN + timedelta(minutes=15)
            dep.cli(
                "enqueue", "down", "--start", format_instant(ORIGIN), "--end", format_instant(end)
            )
            [record] = dep.wait_finished("down", 1, timeout=180)
        finally:
            dep.stop_all()
        pipeline = dep.config.pipeline("down")
        bound = worst_case(
            stage_policy(Stage.PRECHECK, pipeline),
            max_attempts=pipeline.max_attempts,
            failed_retry_base=dep.config.settings.failed_retry_base,
            dispatch_every=pipeline.every,
        )
        assert bound.calls == 3 * (2 + 1) * 2
        # Each call is one request (no SDK retries), and the runner ran the pipeline's policy.
        assert len(search_engine.requests) == bound.calls, search_engine.requests
        assert set(search_engine.requests) == {("POST", "/events/_count")}
    assert record.status == WindowStatus.DEAD
    assert record.attempts == 3
    assert record.stage == Stage.PRECHECK
    assert record.error is not None and re.search(r"gave up after 3 tries", record.error)
