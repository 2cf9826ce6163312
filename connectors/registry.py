"""From a config's `type` to a connector class; connectors built once per pipeline and process,
clients shared by every pipeline of the process that connects to the same place.

Classes are named by import path so that heavy SDKs (boto3, snowflake-connector) load only in
the processes that use them. A connector class takes its validated config model.

`source_for`, `staging_for` and `target_for` return a pipeline's process-wide connectors as the
protocols of `connectors.base`; `connector_for(role, pipeline)` is the same by role, typed per
role, and is the `core.ports.ConnectorFactory` a worker hands to the runner.

A connector is cheap (a config, a table's shape); the engine, SDK client or session under it
is leased from `connectors.shared`, keyed by what it connects to, so a process holds one pool
per database whatever the number of pipelines.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

from pydantic import BaseModel

from connectors import shared
from connectors.base import Batch, Manifest, Source, StagingArea, Target
from core.config import PipelineConfig
from core.errors import ConfigError
from core.ports import ConnectorFactory

Role = Literal["source", "staging", "target"]
"""A connector's role, named as in the config (`[pipelines.<name>.staging]`)."""

Connector = Source | StagingArea | Target

CONNECTORS: dict[Role, dict[str, str]] = {
    "source": {
        "elasticsearch": "connectors.elasticsearch:ElasticsearchSource",
        "opensearch": "connectors.elasticsearch:OpenSearchSource",
        "sql": "connectors.sql:SqlSource",
    },
    "staging": {
        "s3": "connectors.s3:S3Staging",
        "local": "connectors.local:LocalStaging",
    },
    "target": {
        "snowflake": "connectors.snowflake:SnowflakeTarget",
        "sql": "connectors.sql_target:SqlTarget",
    },
}
"""role -> config `type` -> "module:Class". Add a system here and a config model in core.config."""

_C = TypeVar("_C", bound=Connector)

_sources: dict[tuple[str, str], Source] = {}
_stagings: dict[tuple[str, str], StagingArea] = {}
_targets: dict[tuple[str, str], Target] = {}
_instances_lock = threading.Lock()


def connector_class(role: Role, type_name: str) -> type[Any]:
    """Import and return the class registered for `type_name` in `role`."""
    try:
        target = CONNECTORS[role][type_name]
    except KeyError:
        known = ", ".join(sorted(CONNECTORS.get(role, {})))
        raise ConfigError(f"unknown {role} type {type_name!r} (expected one of {known})") from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls: type[Any] = getattr(module, class_name)
    return cls


def _new(role: Role, config: BaseModel) -> object:
    """A new instance of the class registered for `config.type`, built from `config`."""
    connector: object = connector_class(role, getattr(config, "type", ""))(config)
    return connector


def build_source(pipeline: PipelineConfig) -> Source:
    """A new source for `pipeline`, built from its config."""
    source = _new("source", pipeline.source)
    if not isinstance(source, Source):
        raise TypeError(f"{type(source).__name__} is not a Source")
    return source


def build_staging(pipeline: PipelineConfig) -> StagingArea:
    """A new staging area for `pipeline`, built from its config."""
    staging = _new("staging", pipeline.staging)
    if not isinstance(staging, StagingArea):
        raise TypeError(f"{type(staging).__name__} is not a StagingArea")
    return staging


def build_target(pipeline: PipelineConfig) -> Target:
    """A new target for `pipeline`, built from its config."""
    target = _new("target", pipeline.target)
    if not isinstance(target, Target):
        raise TypeError(f"{type(target).__name__} is not a Target")
    return target


def build(role: Role, pipeline: PipelineConfig) -> Connector:
    """A new connector for `pipeline`'s `role`, built from its config (not cached)."""
    builders: dict[Role, Callable[[PipelineConfig], Connector]] = {
        "source": build_source,
        "staging": build_staging,
        "target": build_target,
    }
    return builders[role](pipeline)


def _cached(
    cache: dict[tuple[str, str], _C],
    pipeline: PipelineConfig,
    config: BaseModel,
    make: Callable[[PipelineConfig], _C],
) -> _C:
    """The cached connector of `pipeline` in `cache`, built with `make` on first use.

    Keyed by the config's JSON too, so a changed config gets a new client.
    """
    key = (pipeline.name, config.model_dump_json())
    with _instances_lock:
        instance = cache.get(key)
        if instance is None:
            instance = cache[key] = make(pipeline)
        return instance


def source_for(pipeline: PipelineConfig) -> Source:
    """The process-wide source of `pipeline`, built on first use."""
    return _cached(_sources, pipeline, pipeline.source, build_source)


def staging_for(pipeline: PipelineConfig) -> StagingArea:
    """The process-wide staging area of `pipeline`, built on first use."""
    return _cached(_stagings, pipeline, pipeline.staging, build_staging)


def target_for(pipeline: PipelineConfig) -> Target:
    """The process-wide target of `pipeline`, built on first use."""
    return _cached(_targets, pipeline, pipeline.target, build_target)


@overload
def connector_for(role: Literal["source"], pipeline: PipelineConfig) -> Source: ...
@overload
def connector_for(role: Literal["staging"], pipeline: PipelineConfig) -> StagingArea: ...
@overload
def connector_for(role: Literal["target"], pipeline: PipelineConfig) -> Target: ...
def connector_for(role: Role, pipeline: PipelineConfig) -> Connector:
    """The process-wide connector for `pipeline`'s `role`: `source_for`, `staging_for` or
    `target_for` by name."""
    if role == "source":
        return source_for(pipeline)
    if role == "staging":
        return staging_for(pipeline)
    return target_for(pipeline)


_RUNNER_CONNECTORS: ConnectorFactory[Batch, Manifest] = connector_for
"""Here mypy checks that the registry's connectors give the runner what `core.ports` asks."""


def close_all() -> None:
    """Close every cached connector and every shared client (worker shutdown, tests)."""
    with _instances_lock:
        instances: list[Connector] = [*_sources.values(), *_stagings.values(), *_targets.values()]
        for instance in instances:
            with contextlib.suppress(Exception):  # closing is best effort at shutdown
                instance.close()
        _clear()
    shared.close_all()


def forget_all() -> None:
    """Drop cached connectors and shared clients without closing them: after a fork, the
    parent's sockets are not ours to close."""
    with _instances_lock:
        _clear()
    shared.forget_all()


def _clear() -> None:
    _sources.clear()
    _stagings.clear()
    _targets.clear()
