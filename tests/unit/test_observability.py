"""Logging: identical warnings are rate limited, request lines never are."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from gateway.observability import RepeatLimiter


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
