"""From a config's `type` to a connector class; clients built once per process.

Classes are named by import path so that heavy SDKs (boto3, snowflake-connector) load only in
the processes that use them. A connector class takes its validated config model.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any, Literal

from core.config import PipelineConfig
from core.errors import ConfigError

Role = Literal["source", "stage", "target"]

CONNECTORS: dict[Role, dict[str, str]] = {
    "source": {
        "elasticsearch": "connectors.elasticsearch:ElasticsearchSource",
        "opensearch": "connectors.elasticsearch:OpenSearchSource",
        "sql": "connectors.sql:SqlSource",
    },
    "stage": {
        "s3": "connectors.s3:S3Stage",
        "local": "connectors.local:LocalStage",
    },
    "target": {
        "snowflake": "connectors.snowflake:SnowflakeTarget",
        "sql": "connectors.sql_target:SqlTarget",
    },
}
"""role -> config `type` -> "module:Class". Add a system here and a config model in core.config."""

_instances: dict[tuple[str, Role, str], Any] = {}
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


def build(role: Role, pipeline: PipelineConfig) -> Any:
    """A new connector for `pipeline`'s `role`, built from its config."""
    config = getattr(pipeline, role)
    return connector_class(role, config.type)(config)


def connector_for(role: Role, pipeline: PipelineConfig) -> Any:
    """The process-wide connector for `pipeline`'s `role`, built on first use.

    Keyed by the config's JSON too, so a changed config gets a new client.
    """
    config = getattr(pipeline, role)
    key = (pipeline.name, role, config.model_dump_json())
    with _instances_lock:
        instance = _instances.get(key)
        if instance is None:
            instance = build(role, pipeline)
            _instances[key] = instance
        return instance


def close_all() -> None:
    """Close every cached connector (worker shutdown, tests)."""
    with _instances_lock:
        for instance in _instances.values():
            with contextlib.suppress(Exception):  # closing is best effort at shutdown
                instance.close()
        _instances.clear()


def forget_all() -> None:
    """Drop cached connectors without closing them: after a fork, the parent's sockets are
    not ours to close."""
    with _instances_lock:
        _instances.clear()
