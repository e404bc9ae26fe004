"""Logging: identical warnings are rate limited, request lines never are."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from gateway.shared.observability import IsoTimeStamper, RepeatLimiter, configure_logging


def test_identical_warnings_pass_once_per_interval_and_count_the_rest() -> None:
    """Repeats inside the interval are dropped; the next one after it says how many were."""
    now = [0.0]
    limiter = RepeatLimiter(interval=10, clock=lambda: now[0])

    def warn(**fields: Any) -> dict[str, Any] | None:
        try:
            return dict(limiter(None, "warning", {"event": "store_down", **fields}))
        except structlog.DropEvent:
            return None

    assert warn() == {"event": "store_down"}
    assert warn() is None
    assert warn() is None
    assert warn(operation="claim") is not None  # different fields: not a repeat
    now[0] = 11
    assert warn() == {"event": "store_down", "suppressed_repeats": 2}
    assert warn() is None


def test_info_lines_are_never_limited() -> None:
    """Per-request info lines all pass."""
    limiter = RepeatLimiter(interval=10, clock=lambda: 0.0)
    for _ in range(5):
        assert limiter(None, "info", {"event": "request"}) == {"event": "request"}


@pytest.mark.parametrize("level", ["warning", "error"])
def test_warnings_and_errors_are_both_limited(level: str) -> None:
    """Errors flood too: they are limited like warnings."""
    limiter = RepeatLimiter(interval=10, clock=lambda: 0.0)
    limiter(None, level, {"event": "x"})
    with pytest.raises(structlog.DropEvent):
        limiter(None, level, {"event": "x"})


@pytest.mark.parametrize("json", [True, False])
def test_exception_logs_never_show_frame_locals(
    json: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """A logged exception carries its traceback but not the values of local variables."""
    secret = f"sk-{uuid.uuid4().hex}"  # made at run time: no source line can show it
    configure_logging(json=json)
    try:
        _fail_holding_a_secret(secret)
    except ZeroDivisionError:
        structlog.get_logger("test").exception("failed")
    finally:
        structlog.reset_defaults()
    output = capsys.readouterr().err
    assert "ZeroDivisionError" in output
    assert secret not in output


@pytest.mark.parametrize(
    "now", [0.0, 1_764_460_800.25, 1_764_460_800.999_999, 1_764_460_801.000_001]
)
def test_timestamps_read_as_structlogs_iso_utc(now: float) -> None:
    """The cheap stamper writes what structlog's ISO UTC stamper writes for the same instant."""
    stamped = IsoTimeStamper(clock=lambda: now)(None, "info", {})["timestamp"]
    expected = datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert stamped[:20] == expected[:20]  # to the second, exactly
    assert abs(int(stamped[20:26]) - int(expected[20:26])) <= 1  # microseconds: float rounding
    assert stamped.endswith("Z")


def test_timestamps_follow_the_clock_across_seconds() -> None:
    """The per-second formatting is redone when the second changes."""
    now = [100.5]
    stamper = IsoTimeStamper(clock=lambda: now[0])
    first = stamper(None, "info", {})["timestamp"]
    now[0] = 101.5
    assert stamper(None, "info", {})["timestamp"] == "1970-01-01T00:01:41.500000Z"
    assert first == "1970-01-01T00:01:40.500000Z"


def _fail_holding_a_secret(secret: str) -> None:
    assert secret
    _ = 1 / 0
