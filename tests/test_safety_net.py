"""Which pipelines the cleanup's safety net dispatches (`core.dispatch.pipelines_to_dispatch`):
a pure function of the store's unfinished windows, the config and `now`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from core.config import config_from_dict
from core.dispatch import pipelines_to_dispatch
from core.records import WindowKind, WindowStatus
from core.store import UnfinishedGroup

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
BASE = timedelta(seconds=30)
"""`failed_retry_base`: a window failed after attempt n waits 30 s * 2^(n-1)."""

S = WindowStatus
SCHEDULED, MANUAL = WindowKind.SCHEDULED, WindowKind.MANUAL

PIPELINES = config_from_dict(
    {
        "windowpipe": {"state_url": "sqlite://"},
        "pipelines": {
            "orders": {
                "window": "15m",
                "start": "2026-11-01T00:00:00Z",
                "max_active_windows": 2,
                "max_backfill_windows": 1,
                "max_attempts": 3,
                "source": {"type": "sql", "url": "sqlite://", "table": "events"},
                "staging": {"type": "local", "path": "/unused"},
                "target": {"type": "sql", "url": "sqlite://", "table": "events_loaded"},
            }
        },
    }
).pipelines


def group(
    status: WindowStatus,
    count: int = 1,
    *,
    kind: WindowKind = SCHEDULED,
    attempts: int = 0,
    failed_ago: timedelta | None = None,
    pipeline: str = "orders",
) -> UnfinishedGroup:
    finished = NOW - failed_ago if failed_ago is not None else None
    return UnfinishedGroup(pipeline, kind, status, attempts, count, finished)


@pytest.mark.parametrize(
    ("groups", "dispatched"),
    [
        pytest.param([], [], id="nothing unfinished"),
        pytest.param([group(S.PENDING, 5)], ["orders"], id="pending, room"),
        pytest.param(
            [group(S.PENDING, 5), group(S.RUNNING, 1), group(S.QUEUED, 1)],
            [],
            id="pending, scheduled cap full",
        ),
        pytest.param(
            [group(S.PENDING, 5, kind=MANUAL), group(S.RUNNING, 1)],
            ["orders"],
            id="backfill has room beside a busy schedule",
        ),
        pytest.param(
            [group(S.PENDING, 5, kind=MANUAL), group(S.RUNNING, 1, kind=MANUAL)],
            [],
            id="backfill cap full",
        ),
        pytest.param(
            [group(S.FAILED, attempts=1, failed_ago=timedelta(seconds=29))],
            [],
            id="failed, retry delay not over",
        ),
        pytest.param(
            [group(S.FAILED, attempts=1, failed_ago=timedelta(seconds=30))],
            ["orders"],
            id="failed, retry delay over",
        ),
        pytest.param(
            [group(S.FAILED, attempts=2, failed_ago=timedelta(seconds=59))],
            [],
            id="failed twice waits twice as long",
        ),
        pytest.param(
            [group(S.FAILED, attempts=3, failed_ago=timedelta(0)), group(S.RUNNING, 2)],
            ["orders"],
            id="failed, out of attempts: dispatch buries it even at the cap",
        ),
        pytest.param([group(S.PENDING, pipeline="gone")], [], id="pipeline no longer configured"),
        pytest.param([group(S.RUNNING, 1)], [], id="only running"),
    ],
)
def test_the_safety_net_dispatches_pipelines_with_runnable_windows_and_room(
    groups: list[UnfinishedGroup], dispatched: list[str]
) -> None:
    assert pipelines_to_dispatch(groups, PIPELINES, NOW, failed_retry_base=BASE) == dispatched
