"""Every Redis key is spelled in core/keys.py, and spelled as deployments know it."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from pathlib import Path

from core import keys

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ["core", "workers", "connectors", "windowpipe", "beat_schedule.py"]


def test_key_names_are_the_ones_deployments_rely_on() -> None:
    start = datetime(2026, 11, 1, 0, 15, tzinfo=UTC)
    assert keys.window_lock_key("orders", start) == "windowpipe:lock:orders:2026-11-01T00:15:00Z"
    assert keys.dispatch_lock_key("orders") == "windowpipe:dispatch:orders"
    assert keys.dispatch_requested_key("orders") == "windowpipe:dispatch-requested:orders"
    assert keys.dispatch_recent_key("orders") == "windowpipe:dispatch-recent:orders"
    assert keys.recheck_lock_key("orders") == "windowpipe:recheck:orders"
    assert keys.CLEANUP_RAN_KEY == "windowpipe:ran:cleanup"
    assert keys.generate_ran_key("orders") == "windowpipe:ran:generate:orders"
    assert keys.REDBEAT_KEY_PREFIX == "windowpipe:redbeat:"
    assert keys.REDBEAT_LOCK_KEY == "windowpipe:redbeat:lock"


def key_literals(source: str) -> list[int]:
    """Lines of string literals (f-string parts too) that start a `windowpipe:` Redis key."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and node.value.startswith("windowpipe:")
        and not node.value.startswith("windowpipe: ")  # an error message's prefix
    ]


def test_no_redis_key_is_spelled_outside_core_keys() -> None:
    found = {}
    for entry in SCANNED:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if relative != "core/keys.py" and (lines := key_literals(file.read_text())):
                found[relative] = lines
    assert found == {}, "spell Redis keys in core/keys.py and import them from there"
    assert key_literals((ROOT / "core/keys.py").read_text())  # the scan sees keys


def test_the_scan_finds_a_key_in_an_f_string() -> None:
    assert key_literals('key = f"windowpipe:lock:{pipeline}"') == [1]
    assert key_literals('print(f"windowpipe: error: {text}")') == []
