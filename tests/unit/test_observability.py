"""Logging: identical warnings are rate limited, request lines never are."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import structlog

from gateway.operations.observability import RepeatLimiter, configure_logging


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


def _fail_holding_a_secret(secret: str) -> None:
    assert secret
    _ = 1 / 0
