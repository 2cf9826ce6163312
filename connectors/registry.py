"""From a config's `type` to a connector class; connectors built once per pipeline and process,
clients shared by every pipeline of the process that connects to the same place.

One table, `CONNECTORS`, says per role (as the config names it: `source`, `staging`, `target`)
which class each `type` builds and which protocol of `core.ports` it implements. Classes are
named by import path so that heavy SDKs (boto3, snowflake-connector) load only in the processes
that use them. A connector class takes its validated config model.

`build(role, pipeline)` makes a new connector; `connector_for(role, pipeline)` returns the
pipeline's process-wide one, typed per role, and is the `core.ports.ConnectorFactory` a worker
hands to the runner.

A connector is cheap (a config, a table's shape); the engine, SDK client or session under it
is leased from `connectors.shared`, keyed by what it connects to, so a process holds one pool
per database whatever the number of pipelines.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from dataclasses import dataclass
from typing import Any, Literal, overload

from pydantic import BaseModel

from connectors import shared
from core.config import PipelineConfig
from core.errors import ConfigError
from core.ports import ConnectorFactory, Source, StagingArea, Target

Role = Literal["source", "staging", "target"]
"""A connector's role, named as in the config (`[pipelines.<name>.staging]`)."""

Connector = Source | StagingArea | Target


@dataclass(frozen=True)
class RoleTable:
    """One role's connectors: the protocol they implement and config `type` -> "module:Class"."""

    protocol: type[Source] | type[StagingArea] | type[Target]
    classes: dict[str, str]


CONNECTORS: dict[Role, RoleTable] = {
    "source": RoleTable(
        Source,
        {
            "elasticsearch": "connectors.elasticsearch:ElasticsearchSource",
            "opensearch": "connectors.elasticsearch:OpenSearchSource",
            "sql": "connectors.sql:SqlSource",
        },
    ),
    "staging": RoleTable(
        StagingArea,
        {
            "s3": "connectors.s3:S3Staging",
            "local": "connectors.local:LocalStaging",
        },
    ),
    "target": RoleTable(
        Target,
        {
            "snowflake": "connectors.snowflake:SnowflakeTarget",
            "sql": "connectors.sql_target:SqlTarget",
        },
    ),
}
"""role -> its protocol and config `type` -> "module:Class". Add a system here and a config
model in core.config."""

_instances: dict[tuple[Role, str, str], Connector] = {}
"""(role, pipeline, config JSON) -> the process-wide connector."""
_instances_lock = threading.Lock()


def connector_class(role: Role, type_name: str) -> type[Any]:
    """Import and return the class registered for `type_name` in `role`."""
    try:
        target = CONNECTORS[role].classes[type_name]
    except KeyError:
        known = ", ".join(sorted(CONNECTORS[role].classes)) if role in CONNECTORS else ""
        raise ConfigError(f"unknown {role} type {type_name!r} (expected one of {known})") from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls: type[Any] = getattr(module, class_name)
    return cls


def _config_of(role: Role, pipeline: PipelineConfig) -> BaseModel:
    config: BaseModel = getattr(pipeline, role)
    return config


def build(role: Role, pipeline: PipelineConfig) -> Connector:
    """A new connector for `pipeline`'s `role`, built from its config (not cached)."""
    config = _config_of(role, pipeline)
    connector: object = connector_class(role, getattr(config, "type", ""))(config)
    protocol = CONNECTORS[role].protocol
    if not isinstance(connector, protocol):
        raise TypeError(f"{type(connector).__name__} is not a {protocol.__name__}")
    return connector


@overload
def connector_for(role: Literal["source"], pipeline: PipelineConfig) -> Source: ...
@overload
def connector_for(role: Literal["staging"], pipeline: PipelineConfig) -> StagingArea: ...
@overload
def connector_for(role: Literal["target"], pipeline: PipelineConfig) -> Target: ...
def connector_for(role: Role, pipeline: PipelineConfig) -> Connector:
    """The process-wide connector for `pipeline`'s `role`, built on first use.

    Keyed by the config's JSON too, so a changed config gets a new client.
    """
    key = (role, pipeline.name, _config_of(role, pipeline).model_dump_json())
    with _instances_lock:
        instance = _instances.get(key)
        if instance is None:
            instance = _instances[key] = build(role, pipeline)
        return instance


_RUNNER_CONNECTORS: ConnectorFactory = connector_for
"""Here mypy checks that the registry gives the runner what `core.ports` asks."""


def close_all() -> None:
    """Close every cached connector and every shared client (worker shutdown, tests)."""
    with _instances_lock:
        for instance in list(_instances.values()):
            with contextlib.suppress(Exception):  # closing is best effort at shutdown
                instance.close()
        _instances.clear()
    shared.close_all()


def forget_all() -> None:
    """Drop cached connectors and shared clients without closing them: after a fork, the
    parent's sockets are not ours to close."""
    with _instances_lock:
        _instances.clear()
    shared.forget_all()
