"""A worker process closes what it built (connectors, state store, Redis client) as it ends."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery import signals

import workers.runtime as worker_runtime


@pytest.mark.parametrize(
    "signal", [signals.worker_process_shutdown, signals.worker_shutdown], ids=lambda s: s.name
)
def test_a_worker_process_closes_its_connectors_store_and_redis_when_it_ends(
    monkeypatch: pytest.MonkeyPatch, signal: signals.Signal
) -> None:
    closed: list[str] = []
    monkeypatch.setattr(worker_runtime, "close_all", lambda: closed.append("connectors"))
    fake = SimpleNamespace(
        store=SimpleNamespace(dispose=lambda: closed.append("store")),
        redis=SimpleNamespace(close=lambda: closed.append("redis")),
    )
    monkeypatch.setattr(worker_runtime, "_runtime", fake)

    signal.send(sender=None, pid=1, exitcode=0)

    assert closed == ["connectors", "store", "redis"]
    assert worker_runtime._runtime is None
