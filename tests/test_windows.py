"""Window generation, backfill ranges and instant parsing: pure functions, no services."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.instants import format_duration, format_instant, parse_duration, parse_instant
from core.windows import Window, align_down, due_windows, is_aligned, windows_in_range

ORIGIN = datetime(2026, 11, 1, tzinfo=UTC)
MIN = timedelta(minutes=1)
M15 = timedelta(minutes=15)
H1 = timedelta(hours=1)
D1 = timedelta(days=1)
US = timedelta(microseconds=1)


def at(text: str) -> datetime:
    """`HH:MM[:SS]` on the origin's day, or a full ISO instant."""
    if "T" in text:
        return parse_instant(text)
    return parse_instant(f"2026-11-01T{text}Z")


# --- due_windows: a table of edge cases ---------------------------------------------------------

# (origin, size, lag, cap, last_end, now, first start or None, how many)
# fmt: off
DUE_CASES = [
    pytest.param(ORIGIN, M15, 5 * MIN, 96, None, at("02:07"), at("00:00"), 8, id="design-example"),
    pytest.param(ORIGIN, M15, 5 * MIN, 96, at("00:00"), at("00:20"), at("00:00"), 1,
                 id="end-plus-lag-equal-to-now-is-due"),
    pytest.param(ORIGIN, M15, 5 * MIN, 96, at("00:00"), at("00:20") - US, None, 0,
                 id="one-microsecond-before-is-not-due"),
    pytest.param(ORIGIN, M15, 5 * MIN, 96, at("00:00"), at("00:17"), None, 0,
                 id="inside-the-lag-is-not-due"),
    pytest.param(ORIGIN, M15, 5 * MIN, 96, at("00:15"), at("00:50"), at("00:15"), 2,
                 id="continues-at-the-last-end"),
    pytest.param(ORIGIN, M15, 5 * MIN, 96, None, at("01:05"), at("00:00"), 4,
                 id="first-run-starts-at-origin"),
    pytest.param(ORIGIN, M15, 5 * MIN, 10, None, at("2026-11-02T00:00:00Z"), at("00:00"), 10,
                 id="catch-up-cap-oldest-first"),
    pytest.param(ORIGIN, MIN, timedelta(0), 96, None, at("00:10"), at("00:00"), 10,
                 id="1m-windows-no-lag"),
    pytest.param(ORIGIN, H1, 5 * MIN, 96, None, at("03:04"), at("00:00"), 2, id="1h-windows"),
    pytest.param(ORIGIN, D1, H1, 96, None, at("2026-11-04T00:59:00Z"), at("00:00"), 2,
                 id="1d-windows"),
    pytest.param(at("00:07:30"), M15, timedelta(0), 96, None, at("01:00"), at("00:07:30"), 3,
                 id="origin-not-on-a-round-hour"),
    pytest.param(at("00:07:30"), M15, timedelta(0), 96, at("00:22:30"), at("01:07:30"),
                 at("00:22:30"), 3, id="last-end-on-an-unround-origin-grid"),
    pytest.param(ORIGIN, M15, 5 * MIN, 96, at("00:00"), at("2027-11-01T00:00:00Z"),
                 at("00:00"), 96, id="a-year-behind-is-capped"),
    pytest.param(ORIGIN, M15, timedelta(0), 96, at("2026-10-31T23:00:00Z"), at("01:00"),
                 at("00:00"), 4, id="last-end-before-origin-starts-at-origin"),
    pytest.param(ORIGIN, M15, timedelta(0), 96, None, at("2026-10-31T12:00:00Z"), None, 0,
                 id="now-before-origin"),
    pytest.param(ORIGIN, M15, timedelta(0), 96, at("05:00"), at("02:07"), None, 0,
                 id="last-end-after-now"),
    pytest.param(ORIGIN, M15, 5 * MIN, 96, None, at("2026-11-01T04:07:00+02:00"),
                 at("00:00"), 8, id="now-with-an-offset"),
]
# fmt: on


@pytest.mark.parametrize(
    ("origin", "size", "lag", "cap", "last_end", "now", "first", "count"), DUE_CASES
)
def test_due_windows_edge_cases(
    origin: datetime,
    size: timedelta,
    lag: timedelta,
    cap: int,
    last_end: datetime | None,
    now: datetime,
    first: datetime | None,
    count: int,
) -> None:
    windows = due_windows(
        origin=origin, size=size, lag=lag, max_windows=cap, now=now, last_end=last_end
    )
    assert len(windows) == count
    if count:
        assert windows[0].start == first
        assert windows == [Window(first + i * size, first + (i + 1) * size) for i in range(count)]


def test_design_example_creates_eight_windows_from_midnight_to_two() -> None:
    windows = due_windows(
        origin=at("00:00"), size=M15, lag=5 * MIN, max_windows=96, now=at("02:07")
    )
    assert [str(w) for w in windows[:1]] == ["[2026-11-01T00:00:00Z, 2026-11-01T00:15:00Z)"]
    assert [format_instant(w.start) for w in windows] == [
        f"2026-11-01T{h:02d}:{m:02d}:00Z" for h in (0, 1) for m in (0, 15, 30, 45)
    ]
    assert windows[-1].end == at("02:00")


@pytest.mark.timeout(10)
def test_a_century_of_one_second_windows_is_capped_without_walking_the_gap() -> None:
    windows = due_windows(
        origin=ORIGIN,
        size=timedelta(seconds=1),
        lag=timedelta(0),
        max_windows=96,
        now=ORIGIN + timedelta(days=36500),
        last_end=ORIGIN,
    )
    assert len(windows) == 96
    assert windows[-1].end == ORIGIN + timedelta(seconds=96)


def test_windows_across_a_dst_change_are_exactly_one_size_long() -> None:
    berlin = ZoneInfo("Europe/Berlin")  # 2026-03-29 02:00 CET -> 03:00 CEST
    origin = datetime(2026, 3, 29, 0, 0, tzinfo=berlin)
    windows = due_windows(
        origin=origin, size=H1, lag=timedelta(0), max_windows=96, now=at("2026-03-29T03:00:00Z")
    )
    assert len(windows) == 4
    for window in windows:
        assert window.start.tzinfo is UTC
        assert window.end.astimezone(UTC) - window.start.astimezone(UTC) == H1
    assert windows[-1].end == datetime(2026, 3, 29, 3, 0, tzinfo=UTC)


NAIVE = datetime(2026, 11, 1)

# fmt: off
DUE_ERRORS = [
    pytest.param({"origin": NAIVE}, ValueError, "naive", id="naive-origin"),
    pytest.param({"now": NAIVE}, ValueError, "naive", id="naive-now"),
    pytest.param({"last_end": NAIVE}, ValueError, "naive", id="naive-last-end"),
    pytest.param({"size": timedelta(0)}, ValueError, "longer than zero", id="zero-size"),
    pytest.param({"size": -M15}, ValueError, "longer than zero", id="negative-size"),
    pytest.param({"lag": -MIN}, ValueError, "lag must not be negative", id="negative-lag"),
    pytest.param({"max_windows": 0}, ValueError, "at least 1|>= 1", id="zero-cap"),
    pytest.param({"last_end": at("00:07")}, ValueError, "00:07:00Z is not aligned",
                 id="misaligned-last-end"),
]
# fmt: on


@pytest.mark.parametrize(("override", "error", "match"), DUE_ERRORS)
def test_due_windows_refuses_bad_input(
    override: dict[str, object], error: type[Exception], match: str
) -> None:
    arguments: dict[str, object] = {
        "origin": ORIGIN,
        "size": M15,
        "lag": 5 * MIN,
        "max_windows": 96,
        "now": at("02:07"),
        "last_end": None,
    }
    arguments.update(override)
    with pytest.raises(error, match=match):
        due_windows(**arguments)  # type: ignore[arg-type]


# --- due_windows: properties ------------------------------------------------------------------

SIZES = st.sampled_from([MIN, 5 * MIN, M15, H1, D1, timedelta(seconds=450), timedelta(seconds=7)])


@dataclass(frozen=True)
class Tick:
    """The arguments of one generation tick."""

    origin: datetime
    size: timedelta
    lag: timedelta
    max_windows: int
    now: datetime
    last_end: datetime | None

    def run(self) -> list[Window]:
        return due_windows(
            origin=self.origin,
            size=self.size,
            lag=self.lag,
            max_windows=self.max_windows,
            now=self.now,
            last_end=self.last_end,
        )

    @property
    def cursor(self) -> datetime:
        """Where this tick's first window starts."""
        return self.origin if self.last_end is None else max(self.origin, self.last_end)


@st.composite
def ticks(draw: st.DrawFn) -> Tick:
    """A tick with `now` near the interesting boundaries: a few windows behind or ahead."""
    origin = draw(
        st.datetimes(
            min_value=datetime(2000, 1, 1),
            max_value=datetime(2090, 1, 1),
            timezones=st.just(UTC),
        )
    )
    size = draw(SIZES)
    lag = draw(st.sampled_from([timedelta(0), MIN, 5 * MIN, H1, size]))
    last_k = draw(st.none() | st.integers(-5, 50))
    last_end = None if last_k is None else origin + last_k * size
    cursor = origin if last_end is None else max(origin, last_end)
    windows_ahead = draw(st.integers(-3, 300))
    jitter = draw(st.sampled_from([timedelta(0), US, size - US, size // 2]))
    now = cursor + windows_ahead * size + lag + jitter
    return Tick(origin, size, lag, draw(st.integers(1, 120)), now, last_end)


@settings(max_examples=300, deadline=None)
@given(ticks())
def test_due_windows_are_contiguous_aligned_complete_and_capped(tick: Tick) -> None:
    windows = tick.run()
    assert len(windows) <= tick.max_windows
    for window in windows:
        assert window.size == tick.size
        assert is_aligned(window.start, tick.origin, tick.size)
        assert window.end + tick.lag <= tick.now
    for earlier, later in itertools.pairwise(windows):
        assert earlier.end == later.start  # contiguous, so never overlapping
    if windows:
        assert windows[0].start == tick.cursor
    if len(windows) < tick.max_windows:
        # Below the cap, the tick stops only because the next window is not complete yet.
        next_start = windows[-1].end if windows else tick.cursor
        assert next_start + tick.size + tick.lag > tick.now


@settings(max_examples=200, deadline=None)
@given(ticks())
def test_consecutive_capped_ticks_add_up_to_one_uncapped_tick(tick: Tick) -> None:
    uncapped = replace(tick, max_windows=10**6).run()
    collected: list[Window] = []
    last_end = tick.last_end
    for _ in range(len(uncapped) + 1):
        batch = replace(tick, last_end=last_end).run()
        if not batch:
            break
        collected.extend(batch)
        last_end = batch[-1].end
    assert collected == uncapped


# --- windows_in_range ---------------------------------------------------------------------------


def test_windows_in_range_covers_aligned_bounds_exactly() -> None:
    windows = windows_in_range(origin=ORIGIN, size=M15, start=at("00:30"), end=at("01:30"))
    assert [w.start for w in windows] == [at("00:30"), at("00:45"), at("01:00"), at("01:15")]
    assert windows[-1].end == at("01:30")


def test_windows_in_range_converts_offsets_to_utc() -> None:
    start = parse_instant("2026-11-01T02:00:00+02:00")
    end = datetime(2026, 11, 1, 2, 30, tzinfo=timezone(timedelta(hours=2)))
    windows = windows_in_range(origin=ORIGIN, size=M15, start=start, end=end)
    assert [str(w) for w in windows] == [
        "[2026-11-01T00:00:00Z, 2026-11-01T00:15:00Z)",
        "[2026-11-01T00:15:00Z, 2026-11-01T00:30:00Z)",
    ]


@pytest.mark.parametrize(
    ("start", "end", "match"),
    [
        pytest.param(
            at("00:07"),
            at("01:00"),
            "start 2026-11-01T00:07:00Z is not on a window boundary .*nearest boundaries are "
            "2026-11-01T00:00:00Z and 2026-11-01T00:15:00Z",
            id="misaligned-start",
        ),
        pytest.param(
            at("00:00"),
            at("00:50"),
            "end 2026-11-01T00:50:00Z is not on a window boundary .*nearest boundaries are "
            "2026-11-01T00:45:00Z and 2026-11-01T01:00:00Z",
            id="misaligned-end",
        ),
        pytest.param(at("01:00"), at("00:00"), "must be after start", id="end-before-start"),
        pytest.param(at("01:00"), at("01:00"), "must be after start", id="empty-range"),
        pytest.param(
            at("2026-10-31T23:00:00Z"), at("01:00"), "before the pipeline start", id="pre-origin"
        ),
        pytest.param(NAIVE, at("01:00"), "naive", id="naive-start"),
    ],
)
def test_windows_in_range_refuses_bad_bounds(start: datetime, end: datetime, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        windows_in_range(origin=ORIGIN, size=M15, start=start, end=end)


def test_align_down_returns_the_boundary_at_or_before_an_instant() -> None:
    assert align_down(at("00:14:59"), ORIGIN, M15) == at("00:00")
    assert align_down(at("00:15"), ORIGIN, M15) == at("00:15")
    assert align_down(at("2026-10-31T23:50:00Z"), ORIGIN, M15) == at("2026-10-31T23:45:00Z")


def test_window_refuses_an_end_not_after_its_start() -> None:
    with pytest.raises(ValueError, match="is not after its start"):
        Window(at("00:15"), at("00:15"))


# --- core.instants --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", M15),
        ("1h", H1),
        ("1d", D1),
        ("1w", timedelta(weeks=1)),
        (" 5m ", 5 * MIN),
    ],
)
def test_parse_duration_reads_units(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["15", "m", "1.5h", "-5m", "", "15 minutes", "1y"])
def test_parse_duration_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration like '15m'"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (M15, "15m"),
        (H1, "1h"),
        (2 * H1, "2h"),
        (D1, "1d"),
        (timedelta(weeks=2), "2w"),
        (timedelta(seconds=90), "90s"),
    ],
)
def test_format_duration_uses_the_largest_exact_unit(value: timedelta, expected: str) -> None:
    assert format_duration(value) == expected


@given(st.integers(1, 10**7))
def test_format_duration_round_trips_whole_seconds(seconds: int) -> None:
    value = timedelta(seconds=seconds)
    assert parse_duration(format_duration(value)) == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-01T00:00:00Z", ORIGIN),
        ("2026-11-01T00:00:00z", ORIGIN),
        ("2026-11-01T02:00:00+02:00", ORIGIN),
        ("2026-10-31T19:00:00-05:00", ORIGIN),
        ("2026-11-01T00:00:00.000001+00:00", ORIGIN + US),
    ],
)
def test_parse_instant_converts_offsets_to_utc(text: str, expected: datetime) -> None:
    parsed = parse_instant(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("2026-11-01T00:00:00", "has no UTC offset"),
        ("tomorrow", "expected an ISO 8601 instant"),
        ("", "expected an ISO 8601 instant"),
    ],
)
def test_parse_instant_refuses_naive_and_garbage(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_instant(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (ORIGIN, "2026-11-01T00:00:00Z"),
        (datetime(2026, 11, 1, 2, 0, tzinfo=timezone(timedelta(hours=2))), "2026-11-01T00:00:00Z"),
        (ORIGIN + US, "2026-11-01T00:00:00.000001Z"),
    ],
)
def test_format_instant_prints_utc_with_z(value: datetime, expected: str) -> None:
    assert format_instant(value) == expected


def test_format_instant_refuses_naive() -> None:
    with pytest.raises(ValueError, match="naive"):
        format_instant(NAIVE)
