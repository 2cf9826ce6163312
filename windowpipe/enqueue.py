"""Manual runs and backfills: the one code path of `windowpipe enqueue` and of the web view's
re-run (`windowpipe web`), so both apply the same range checks, the same cap and the same
writes.

In order, and nothing is written before every check passed: the range is checked
(`backfill_windows`: not empty, not beyond the newest due window, at most MAX_ENQUEUE_WINDOWS
windows, on window boundaries), every message system must answer, then the windows are
created, with `force` finished or dead ones are put back to pending (RESET: fence + 1, so a
worker still holding one is fenced out), and the dispatcher queues what the pipeline's caps
allow now; the rest follow as windows finish.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from core.config import Config, PipelineConfig
from core.errors import BadInputError, WindowpipeError
from core.instants import format_duration, format_instant, utc_now
from core.records import WindowKind
from core.windows import Window, align_down, windows_in_range

if TYPE_CHECKING:
    from core.store import StateStore

MAX_ENQUEUE_WINDOWS = 100_000
"""The most windows one `enqueue` may create; a longer backfill is split into several ranges."""


class SystemsUnreachableError(WindowpipeError):
    """Redis, the broker or the result backend did not answer: nothing was written."""


@dataclass(frozen=True)
class Enqueued:
    """What one enqueue did."""

    windows: list[Window]
    """The windows of the range, oldest first."""
    created: int
    reset: int
    """Finished or dead windows put back to pending (`force` only)."""
    queued: int
    """Windows the dispatcher queued at once; the rest follow as windows finish."""

    def summary(self, pipeline: str) -> str:
        return (
            f"{pipeline}: {len(self.windows)} window(s) in range, {self.created} created, "
            f"{self.reset} reset for re-run, {self.queued} queued now (the rest follow as "
            f"windows finish)"
        )


def backfill_windows(
    settings: PipelineConfig, first: datetime, last: datetime, now: datetime
) -> list[Window]:
    """The windows `enqueue` creates for `[first, last)`, after every check of the range.

    The range is refused (BadInputError) before a single window is built when it is empty,
    reaches beyond the newest window that is due `now` (windows are due once `end + lag <=
    now`, as in generation), or holds more than MAX_ENQUEUE_WINDOWS windows; so an unbounded
    end costs nothing. Bounds that are not window boundaries are refused by
    `windows_in_range`, which names the nearest boundaries.
    """
    origin, size, lag = settings.start, settings.window, settings.lag
    if last <= first:
        raise BadInputError(
            f"--end {format_instant(last)} must be after --start {format_instant(first)}"
        )
    # Compare with `now - lag` rather than `last + lag`: an end near year 9999 plus a lag would
    # overflow.
    horizon = now - lag
    if last > horizon:
        newest = align_down(horizon, origin, size) if horizon >= origin + size else None
        due = (
            f"the newest due window ends at {format_instant(newest)}"
            if newest is not None
            else f"no window of {settings.name} is due yet"
        )
        raise BadInputError(
            f"--end {format_instant(last)} is beyond the newest due window: a window is due "
            f"once its end plus the lag ({format_duration(lag)}) has passed; {due}"
        )
    span = last - max(first, origin)
    count = -(-span // size) if span > timedelta(0) else 0
    if count > MAX_ENQUEUE_WINDOWS:
        raise BadInputError(
            f"--start {format_instant(first)} --end {format_instant(last)} holds {count:,} "
            f"windows of {format_duration(size)}; one enqueue creates at most "
            f"{MAX_ENQUEUE_WINDOWS:,}: split the range"
        )
    try:
        return windows_in_range(origin=origin, size=size, start=first, end=last)
    except ValueError as error:
        raise BadInputError(str(error)) from None


def enqueue_range(
    config: Config,
    settings: PipelineConfig,
    first: datetime,
    last: datetime,
    *,
    force: bool,
    now: datetime,
    open_store: Callable[[], StateStore],
    chain_sender: Callable[[], Any],
) -> Enqueued:
    """Create the windows of `[first, last)`, with `force` reset the finished or dead ones for
    a re-run, and dispatch: what `windowpipe enqueue [--force]` does.

    `open_store` and `chain_sender` are called only once the range passed its checks and every
    message system answered (the CLI migrates the store there; the web view hands over the
    store and the sender it holds). Raises BadInputError for a bad range and
    SystemsUnreachableError when a message system does not answer, in both cases before
    anything is written.
    """
    # Imported here: windowpipe.cli imports this module.
    from windowpipe.cli.systems import unreachable

    windows = backfill_windows(settings, first, last, now)
    # Everything the run needs must answer before the first window is written.
    problems = unreachable(config)
    if problems:
        raise SystemsUnreachableError(problems[0])
    send_chain = chain_sender()
    store = open_store()
    pipeline = settings.name
    created = store.create_windows(pipeline, windows, kind=WindowKind.MANUAL)
    reset = 0
    if force:
        reset = store.reset_for_rerun(pipeline, [w.start for w in windows], kind=WindowKind.MANUAL)
    queued = dispatch_now(config, settings, store, send_chain)
    return Enqueued(windows, len(created), reset, queued)


def dispatch_now(
    config: Config, settings: PipelineConfig, store: StateStore, send_chain: Any
) -> int:
    """Run the pipeline's dispatcher once now (it queues what the caps allow); how many it
    queued."""
    import redis

    from core.dispatch import dispatch

    with redis.Redis.from_url(config.settings.redis_url) as client:
        queued, _ = dispatch(
            store,
            client,
            settings,
            send_chain,
            utc_now(),
            failed_retry_base=config.settings.failed_retry_base,
        )
    return len(queued)
