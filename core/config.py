"""The windowpipe config: one TOML file, validated into models, `WINDOWPIPE_*` overrides.

The keys are the README's "Configuration" section. The file is found (`--config`, else
`$WINDOWPIPE_CONFIG`, else `./windowpipe.toml`), parsed, validated, and every problem is
reported as one line naming the file, the key and what is wrong. Secrets never live in the
file: a connector names the environment variable that holds one (`password_env`), and the value
is read only when a client is built (`resolve_secret`).
"""

from __future__ import annotations

import os
import tomllib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from core.errors import ConfigError
from core.instants import format_duration, format_instant, parse_duration, parse_instant
from core.records import Stage
from core.retry import (
    FAILED_RETRY_BASE,
    STAGE_POLICIES,
    StagePolicy,
    longest_task_seconds,
)

DEFAULT_CONFIG_PATH = "windowpipe.toml"
"""Where the config is looked for when neither `--config` nor `$WINDOWPIPE_CONFIG` is given."""


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    return parse_duration(value)


def _instant(value: Any) -> datetime:
    return parse_instant(value)


Duration = Annotated[
    timedelta, BeforeValidator(_duration), PlainSerializer(format_duration, return_type=str)
]
"""A duration written `90s`, `15m`, `1h`, `1d` or `1w`."""

Instant = Annotated[
    datetime, BeforeValidator(_instant), PlainSerializer(format_instant, return_type=str)
]
"""An aware instant, ISO 8601 with an offset; stored as UTC."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- connectors -------------------------------------------------------------------------------


class ElasticsearchSourceConfig(_Strict):
    """An Elasticsearch index pattern read with point in time + search_after."""

    type: Literal["elasticsearch"]
    hosts: list[str] = Field(min_length=1)
    index: str = Field(min_length=1)
    timestamp_field: str = "@timestamp"
    version_field: str | None = None
    """A field that changes on every update (`updated_at`, `_seq_no`): rechecks and reconcile
    compare its max per window with what was loaded, to see in-place updates."""
    page_size: int = Field(default=1000, ge=1, le=10000)
    slices: int = Field(default=1, ge=1, le=64)
    username: str | None = None
    password_env: str | None = None
    api_key_env: str | None = None
    verify_certs: bool = True
    ca_certs: str | None = None
    request_timeout: float = Field(default=30.0, gt=0)
    pit_keep_alive: str = "5m"
    max_document_bytes: int = Field(default=16 * 1024 * 1024, ge=1)


class OpenSearchSourceConfig(ElasticsearchSourceConfig):
    """The same source for OpenSearch / AWS OpenSearch, through opensearch-py."""

    type: Literal["opensearch"]  # type: ignore[assignment]


class SqlSourceConfig(_Strict):
    """A table with a timestamp column, read with keyset pagination through SQLAlchemy."""

    type: Literal["sql"]
    url: str = Field(min_length=1)
    table: str = Field(min_length=1)
    timestamp_column: str = "created_at"
    id_column: str = "id"
    version_column: str | None = None
    """A column that changes on every update (`updated_at`, a row version): rechecks and
    reconcile compare its max per window with what was loaded, to see in-place updates."""
    page_size: int = Field(default=5000, ge=1)
    password_env: str | None = None
    max_document_bytes: int = Field(default=16 * 1024 * 1024, ge=1)


class S3StagingConfig(_Strict):
    """gzip NDJSON files and a manifest per window in an S3 bucket (or MinIO, moto)."""

    type: Literal["s3"]
    bucket: str = Field(min_length=3)
    prefix: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    access_key_id_env: str | None = None
    secret_access_key_env: str | None = None
    max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    multipart_chunk_bytes: int = Field(default=8 * 1024 * 1024, ge=5 * 1024 * 1024)
    gzip_level: int = Field(default=1, ge=1, le=9)
    """zlib level of the staged files: 1 compresses 3x faster than zlib's default 6 for files
    about 13 % larger (bench 2's rows), and compression is on extract's critical path."""


class LocalStagingConfig(_Strict):
    """The S3 staging's layout, in a local directory."""

    type: Literal["local"]
    path: str = Field(min_length=1)
    prefix: str = ""
    max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    gzip_level: int = Field(default=1, ge=1, le=9)
    """zlib level of the staged files: 1 compresses 3x faster than zlib's default 6 for files
    about 13 % larger (bench 2's rows), and compression is on extract's critical path."""


class SnowflakeTargetConfig(_Strict):
    """A Snowflake table loaded with `COPY INTO` from a Snowflake stage over the S3 staging."""

    type: Literal["snowflake"]
    account: str = Field(min_length=1)
    user: str = Field(min_length=1)
    password_env: str | None = None
    private_key_path: str | None = None
    role: str | None = None
    warehouse: str | None = None
    database: str = Field(min_length=1)
    schema_: str = Field(alias="schema", min_length=1)
    table: str = Field(min_length=1)
    stage: str = Field(min_length=1)
    host: str | None = None
    port: int | None = None
    protocol: Literal["https", "http"] | None = None
    login_timeout: int = Field(default=60, ge=1)
    network_timeout: int = Field(default=int(STAGE_POLICIES[Stage.LOAD].soft_time_limit), ge=1)
    """Seconds the Snowflake connector keeps retrying one failing request (it has no switch to
    turn its retries off), and the longest a statement may run before the connector cancels it.
    The default is the load stage's soft time limit (`core.retry.STAGE_POLICIES`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SqlTargetConfig(_Strict):
    """A table in PostgreSQL, DuckDB or SQLite, loaded idempotently per window."""

    type: Literal["sql"]
    url: str = Field(min_length=1)
    table: str = Field(min_length=1)
    password_env: str | None = None
    batch_size: int = Field(default=5000, ge=1)


SourceConfig = Annotated[
    ElasticsearchSourceConfig | OpenSearchSourceConfig | SqlSourceConfig,
    Field(discriminator="type"),
]
StagingConfig = Annotated[S3StagingConfig | LocalStagingConfig, Field(discriminator="type")]
TargetConfig = Annotated[SnowflakeTargetConfig | SqlTargetConfig, Field(discriminator="type")]


# --- pipelines --------------------------------------------------------------------------------


OLD_STAGING_KEY = "stage"
"""The old name of a pipeline's `staging` table, still accepted (one or the other, not both)."""


class PipelineConfig(_Strict):
    """One pipeline: its window rules, run limits and its three connectors."""

    name: str
    window: Duration
    start: Instant
    lag: Duration = timedelta(0)
    max_windows_per_tick: int = Field(default=96, ge=1)
    every: Duration = timedelta(minutes=5)
    max_active_windows: int = Field(default=16, ge=1)
    """At most this many scheduled windows queued or running at once."""
    # 8, measured (bench 6, docs/BENCHMARKS.md): live windows wait behind the backfill's queued
    # tasks, about (backfill windows in flight) / (backfill windows/s). With two 10,000-window
    # backfills beside live pipelines, live p95 was 1.04x at 4, 1.08-1.10x at 8, 1.17x at 16
    # (goal <= 1.1x); one backfill alone ran 15.7, 19.5 and 25.6 windows/s. Per pipeline, so
    # concurrent backfills add up.
    max_backfill_windows: int = Field(default=8, ge=1)
    """At most this many manual/backfill windows queued or running at once."""
    recheck: list[Duration] = Field(default_factory=list, max_length=16)
    """Ages after a window's end at which a finished window is compared with its source again
    (`["1h", "1d", "7d"]`); a window that drifted is re-run. Empty: never."""
    max_rechecks_per_tick: int = Field(default=200, ge=1, le=100_000)
    """At most this many windows compared per recheck task (one count query each)."""
    rerun_on_drift: bool = False
    """When the audit finds the source changed since extract's snapshot (documents arrived
    late, or went), re-run the window at once instead of recording the drift and leaving it to
    the recheck horizons or `windowpipe reconcile`."""
    max_attempts: int = Field(default=5, ge=1)
    """Attempts of a window before it is dead (the outermost retry layer, core/retry.py)."""
    # The retry keys' defaults and caps are core/retry.py's `StagePolicy`; the most tries and
    # re-sends a pipeline may ask for (100) are the config's own bound.
    step_attempts: int | None = Field(default=None, ge=1, le=100)
    """Tries of one connector call inside a stage task; unset: the stage's default
    (`StagePolicy.step_attempts`)."""
    step_backoff: float | None = Field(default=None, ge=0, le=StagePolicy.step_wait_max)
    """Seconds: the longest wait before a call's second try, doubling up to
    `StagePolicy.step_wait_max`; unset: `StagePolicy.step_backoff`."""
    task_retries: int | None = Field(default=None, ge=0, le=100)
    """Re-sends of a stage task after a transient failure; unset: the stage's default
    (`StagePolicy.task_retries`)."""
    task_backoff: float | None = Field(default=None, ge=0, le=StagePolicy.backoff_cap)
    """Seconds: the longest countdown of the first re-send, doubling up to
    `StagePolicy.backoff_cap`; unset: `StagePolicy.backoff_base`."""
    source: SourceConfig
    staging: StagingConfig
    """Where documents wait between extract and load (`[pipelines.NAME.staging]`)."""
    target: TargetConfig

    @model_validator(mode="before")
    @classmethod
    def _staging_old_name(cls, data: Any) -> Any:
        """`[pipelines.NAME.stage]` is the old name of `[pipelines.NAME.staging]`; both at once
        is refused rather than one silently winning."""
        if isinstance(data, dict) and OLD_STAGING_KEY in data:
            if "staging" in data:
                raise ValueError(
                    f"both staging and {OLD_STAGING_KEY} (its old name) are set; keep staging"
                )
            data = {
                ("staging" if key == OLD_STAGING_KEY else key): value for key, value in data.items()
            }
        return data

    @field_validator("window")
    @classmethod
    def _window_positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("window must be longer than zero")
        return value

    @field_validator("every")
    @classmethod
    def _every_positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("every must be longer than zero")
        return value

    @field_validator("recheck")
    @classmethod
    def _recheck_ascending(cls, value: list[timedelta]) -> list[timedelta]:
        if any(horizon <= timedelta(0) for horizon in value):
            raise ValueError("recheck horizons must be longer than zero")
        if value != sorted(set(value)):
            raise ValueError('recheck horizons must be distinct and ascending, e.g. ["1h", "1d"]')
        return value

    @field_validator("lag")
    @classmethod
    def _lag_not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("lag must not be negative")
        return value


def _tls_settled(url: str) -> str:
    """A `rediss://` URL must say how to check the server's certificate: Celery refuses one
    without `ssl_cert_reqs` when a worker starts; refuse it here, in one line, instead."""
    if url.startswith("rediss://"):
        from urllib.parse import parse_qs, urlsplit

        reqs = parse_qs(urlsplit(url).query).get("ssl_cert_reqs", [""])[0]
        if reqs.lower() not in {
            "required",
            "optional",
            "none",
            "cert_required",
            "cert_optional",
            "cert_none",
        }:
            raise ValueError(
                "a rediss:// URL needs ?ssl_cert_reqs=required (or optional, none), e.g. "
                "rediss://host:6380/0?ssl_cert_reqs=required&ssl_ca_certs=/path/ca.pem"
            )
    return url


class Settings(BaseSettings):
    """The `[windowpipe]` table; every key can be overridden by `WINDOWPIPE_<KEY>`."""

    model_config = SettingsConfigDict(env_prefix="WINDOWPIPE_", extra="forbid", frozen=True)

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Window locks, and the Celery broker and result backend unless broker_url is set."""
    state_url: str = "sqlite:///windowpipe.db"
    """SQLAlchemy URL of the window records."""
    broker_url: str | None = None
    """Optional Celery broker (e.g. amqp:// for RabbitMQ); locks always stay in Redis."""
    result_backend_url: str | None = None
    """Optional Celery result backend; defaults to redis_url."""
    lock_ttl: Duration = timedelta(seconds=60)
    """How long a window lock lives without renewal; renewed every third of it while work runs."""
    stale_after: Duration = timedelta(minutes=30)
    """A window queued this long with no lock held is considered lost and requeued."""
    cleanup_every: Duration = timedelta(minutes=1)
    """How often beat runs the stale-lock cleanup."""
    generation_batch: int = Field(default=50, ge=1, le=1000)
    """Pipelines per generation task: beat sends one task per this many pipelines sharing an
    `every` (1: a task per pipeline)."""
    failed_retry_base: Duration = FAILED_RETRY_BASE
    """A failed window waits this long before its next attempt, doubling each attempt (at most
    `core.retry.FAILED_RETRY_CAP`)."""
    visibility_timeout: Duration = timedelta(hours=2)
    """Redis broker/result visibility timeout; must exceed the longest stage plus its backoff,
    or Redis redelivers tasks that are still running (celery/celery#5935)."""
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator("visibility_timeout")
    @classmethod
    def _visibility_above_longest_task(cls, value: timedelta) -> timedelta:
        if value.total_seconds() <= longest_task_seconds():
            raise ValueError(
                f"visibility_timeout must exceed the longest stage plus its retry backoff "
                f"({int(longest_task_seconds())}s), or Redis redelivers running tasks"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis://, rediss:// or unix:// URL, got {_safe(value)!r}")
        return _tls_settled(_address_checked(value))

    @field_validator("broker_url", "result_backend_url")
    @classmethod
    def _broker_scheme(cls, value: str | None) -> str | None:
        schemes = ("redis://", "rediss://", "amqp://", "amqps://", "pyamqp://")
        if value is not None and not value.startswith(schemes):
            raise ValueError(f"expected a redis://, rediss:// or amqp:// URL, got {_safe(value)!r}")
        return _tls_settled(_address_checked(value)) if value is not None else None

    @field_validator("state_url")
    @classmethod
    def _sqlalchemy_url(cls, value: str) -> str:
        return _state_url_checked(value)

    @field_validator("lock_ttl", "stale_after", "cleanup_every")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than zero")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file, which is passed in as init values.
        return (env_settings, init_settings)


class Config(_Strict):
    """The whole validated config."""

    path: str
    settings: Settings
    pipelines: dict[str, PipelineConfig]

    def pipeline(self, name: str) -> PipelineConfig:
        """The pipeline called `name`; a BadInputError naming the known ones otherwise."""
        try:
            return self.pipelines[name]
        except KeyError:
            known = ", ".join(sorted(self.pipelines)) or "none"
            raise ConfigError(
                f"{self.path}: unknown pipeline {name!r} (configured: {known})"
            ) from None

    @model_validator(mode="after")
    def _names_match_keys(self) -> Config:
        for key, pipeline in self.pipelines.items():
            if key != pipeline.name:
                raise ValueError(f"pipeline key {key!r} and name {pipeline.name!r} differ")
        return self


STATE_STORE_BACKENDS = ("sqlite", "postgresql")
"""The databases the state store runs on (its SQL uses their dialects' INSERT ... RETURNING)."""


def _state_url_checked(value: str) -> str:
    """A state_url the state store can open: parsed, a supported database, its driver installed.

    Checked with the config, so workers, beat and every command refuse it in one line before
    anything is written, instead of failing (with a traceback) at the first connection.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(
            f"not a SQLAlchemy URL (e.g. sqlite:///windowpipe.db): {_safe(value)!r}"
        ) from None
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    if backend not in STATE_STORE_BACKENDS:
        raise ValueError(
            f"unsupported database {backend!r} in {shown!r}; the state store needs sqlite "
            f"(sqlite:///windowpipe.db) or postgresql (postgresql+psycopg://user@host/db)"
        )
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        raise ValueError(
            f"unknown {backend} driver {url.get_driver_name()!r} in {shown!r}"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as error:
        hint = "; use postgresql+psycopg:// (psycopg comes with windowpipe)" * (
            backend == "postgresql"
        )
        raise ValueError(
            f"the {backend} driver {url.get_driver_name()!r} of {shown!r} is not installed "
            f"(no module {error.name or error}){hint}"
        ) from None
    return value


def _address_checked(url: str) -> str:
    """A Redis or AMQP URL whose port is a number from 1 to 65535 and whose Redis database
    (`/N` or `?db=N`) is a whole number; anything else is refused in one line here rather than
    by redis-py or kombu at the first connection, after windows were written."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {_safe(url)!r}: expected a number from 1 to 65535") from None
    if port == 0:
        raise ValueError(f"bad port in {_safe(url)!r}: expected a number from 1 to 65535")
    if parts.scheme in ("redis", "rediss"):
        databases = [parts.path.strip("/")] if parts.path.strip("/") else []
        databases += parse_qs(parts.query).get("db", [])
        for database in databases:
            if not database.isdigit():
                raise ValueError(
                    f"bad Redis database {database!r} in {_safe(url)!r}: expected a whole "
                    f"number, e.g. redis://127.0.0.1:6379/0"
                )
    elif parts.scheme == "unix" and not parts.path:
        raise ValueError(f"a unix:// URL needs a socket path, got {_safe(url)!r}")
    return url


def _safe(url: str) -> str:
    """A URL with any password replaced, fit for an error message."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


# --- loading ----------------------------------------------------------------------------------


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file to read: `--config`, else `$WINDOWPIPE_CONFIG`, else ./windowpipe.toml."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("WINDOWPIPE_CONFIG") or DEFAULT_CONFIG_PATH)


def _format_location(loc: tuple[Any, ...]) -> str:
    # pydantic puts the discriminator's tag into the location (source.elasticsearch.index);
    # users wrote source.index, so drop tags that are connector types.
    parts: list[str] = []
    for item in loc:
        if isinstance(item, str) and item in _CONNECTOR_TAGS and parts and parts[-1] in ROLES:
            continue
        if item == "schema_":
            item = "schema"
        parts.append(str(item))
    return ".".join(parts)


ROLES = ("source", "staging", "target")
"""A pipeline's connector roles, as its config tables and the registry name them."""

_CONNECTOR_TAGS = {"elasticsearch", "opensearch", "sql", "s3", "local", "snowflake"}


def _first_error_line(
    path: Path, error: ValidationError, prefix: str, staging_key: str = "staging"
) -> str:
    """One line for the first problem, the key named as the user wrote it (`staging_key`: the
    pipeline's staging table under its new or its old name)."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    if loc[:1] == ("staging",):
        loc = (staging_key, *loc[1:])
    location = _format_location(loc)
    key = f"{prefix}.{location}" if prefix and location else (prefix or location)
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "missing":
        message = "missing required key"
    elif first["type"] == "union_tag_invalid":
        tag = first.get("input", {}).get("type") if isinstance(first.get("input"), dict) else None
        expected = first.get("ctx", {}).get("expected_tags", "")
        message = f"unknown connector type {tag!r} (expected one of {expected})"
    elif first["type"] == "union_tag_not_found":
        message = "missing required key 'type'"
    message = message.removeprefix("Value error, ")
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{path}: {key}: {message}{suffix}"


def _secret_env_names(model: BaseModel) -> list[tuple[str, str]]:
    names = []
    for field_name in type(model).model_fields:
        if field_name.endswith("_env"):
            value = getattr(model, field_name)
            if value:
                names.append((field_name, value))
    return names


def load_config(
    path: str | os.PathLike[str] | None = None, *, require_secrets: bool = True
) -> Config:
    """Read, validate and return the config; raise ConfigError with one line on any problem.

    With `require_secrets` (what workers and every command that reaches a system use), each
    secret's environment variable must be set; commands that only read the config and the
    state store (`plan`, `status`, `validate`, `locks`) work without the secrets.
    """
    file = config_path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{file}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{file}: config file is not readable (permission denied)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: config file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{file}: not valid TOML: {error}") from None
    return config_from_dict(raw, file, require_secrets=require_secrets)


def config_from_dict(
    raw: dict[str, Any],
    file: str | os.PathLike[str] = "<config>",
    *,
    require_secrets: bool = True,
) -> Config:
    """Validate an already parsed config (the TOML file's tables) into a Config."""
    file = Path(file)
    unknown = sorted(set(raw) - {"windowpipe", "pipelines"})
    if unknown:
        raise ConfigError(f"{file}: {unknown[0]}: unknown top-level table")
    table = raw.get("windowpipe", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{file}: windowpipe: must be a table")
    try:
        settings = Settings(**table)
    except ValidationError as error:
        raise ConfigError(_first_error_line(file, error, "windowpipe")) from None

    pipelines_raw = raw.get("pipelines", {})
    if not isinstance(pipelines_raw, dict):
        raise ConfigError(f"{file}: pipelines: must be a table of pipelines")
    pipelines: dict[str, PipelineConfig] = {}
    for name, body in pipelines_raw.items():
        prefix = f"pipelines.{name}"
        if not isinstance(body, dict):
            raise ConfigError(f"{file}: {prefix}: must be a table")
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(
                f"{file}: {prefix}: pipeline names may use letters, digits, '-' and '_' only"
            )
        staging_key = OLD_STAGING_KEY if OLD_STAGING_KEY in body else "staging"
        try:
            pipeline = PipelineConfig(name=name, **body)
        except ValidationError as error:
            raise ConfigError(_first_error_line(file, error, prefix, staging_key)) from None
        if require_secrets:
            _check_secrets_set(file, prefix, pipeline, staging_key)
        pipelines[name] = pipeline
    return Config(path=str(file), settings=settings, pipelines=pipelines)


def _check_secrets_set(
    file: Path, prefix: str, pipeline: PipelineConfig, staging_key: str = "staging"
) -> None:
    """Every secret environment variable the pipeline's connectors name must be set."""
    for role in ROLES:
        for field_name, env_name in _secret_env_names(getattr(pipeline, role)):
            if env_name not in os.environ:
                key = staging_key if role == "staging" else role
                raise ConfigError(
                    f"{file}: {prefix}.{key}.{field_name}: environment variable "
                    f"{env_name} is not set"
                )


def resolve_secret(env_name: str | None) -> str | None:
    """Read a secret from the environment variable a connector names; None if none is named."""
    if not env_name:
        return None
    try:
        return os.environ[env_name]
    except KeyError:
        raise ConfigError(f"environment variable {env_name} (a secret) is not set") from None


def config_toml(settings: dict[str, Any], pipelines: dict[str, dict[str, Any]]) -> str:
    """A windowpipe.toml's text from plain dicts: `settings` as `[windowpipe]`, each pipeline as
    `[pipelines.NAME]` with its `source`/`staging`/`target` sub-tables (the inverse of
    `config_from_dict`). Values that are not TOML's own (a Path, say) are written as strings."""
    import tomli_w

    return tomli_w.dumps({"windowpipe": _toml_plain(settings), "pipelines": _toml_plain(pipelines)})


def _toml_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _toml_plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_toml_plain(item) for item in value]
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)
