"""The request log line: written straight by the JSON renderer, byte for byte the chain's line."""

from __future__ import annotations

import re
from collections.abc import Iterator

import orjson
import pytest
import structlog

from gateway.catalog import Provider
from gateway.dispatch.job import DispatchRecord
from gateway.dispatch.outcomes import Attempt
from gateway.edge import request_log
from gateway.shared.decisions import RecentDecisions
from gateway.shared.metrics import Metrics
from gateway.shared.observability import configure_logging, json_lines
from tests.support.keys import plain_key

STAMP = re.compile(rb'"timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"')
DURATION = re.compile(rb'"duration_ms":[0-9.]+,')


@pytest.fixture(autouse=True)
def _own_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A logger caches its configuration on first use: the module's own must not keep this one.
    monkeypatch.setattr(request_log, "logger", structlog.get_logger("gateway.edge.proxy"))
    yield
    structlog.reset_defaults()


def _record() -> DispatchRecord:
    served = Provider(
        name="node-b",
        routing_identity="node-b",
        base_url="http://127.0.0.1:1",
        upstream_models={"m": "m"},
        credential="sk-upstream-secret",
        group=None,
        max_concurrency=None,
        min_start_interval_seconds=0.0,
    )
    return DispatchRecord(
        attempts=[Attempt("node-a", "timeout"), Attempt("node-b", "ok", status=200)],
        served=served,
        status=200,
        ttft_seconds=0.0123,
        bytes_sent=321,
    )


def _log_one() -> None:
    request_log.record_request(
        request_log.RequestMetrics(Metrics()),
        RecentDecisions(4),
        request_id="abc-1",
        affinity="rebound",
        route=["node-a", "node-b"],
        key=plain_key("team-a"),
        requested="m-alias",
        model="m",
        names_no_model=False,
        record=_record(),
        status=200,
        started_at=0.0,
    )


def _lines(output: bytes) -> list[bytes]:
    """The lines with their instant and duration (clock readings) blanked."""
    return [
        DURATION.sub(b'"duration_ms":0,', STAMP.sub(b'"timestamp":"T"', line))
        for line in output.splitlines()
    ]


def test_the_written_line_is_the_chains_line(
    capsysbinary: pytest.CaptureFixture[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same fields, same order, same values (only the clock readings differ)."""
    configure_logging(json=True)
    assert json_lines() is not None
    _log_one()
    written = capsysbinary.readouterr().err
    monkeypatch.setattr(request_log, "json_lines", lambda: None)  # through structlog's chain
    _log_one()
    chained = capsysbinary.readouterr().err
    assert STAMP.search(written)
    assert STAMP.search(chained)
    assert DURATION.search(written)
    assert _lines(written) == _lines(chained)
    line = orjson.loads(written)
    assert list(line)[-3:] == ["event", "level", "timestamp"]
    assert line["key_id"] == "team-a"
    assert line["attempts"] == ["node-a:timeout", "node-b:ok"]
    assert b"sk-upstream-secret" not in written
    assert b"0" * 64 not in written


def test_a_level_above_info_writes_no_request_line(
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    """The configured level still filters the line written without the chain."""
    configure_logging(json=True, level="warning")
    _log_one()
    assert capsysbinary.readouterr().err == b""


def test_captured_logs_still_see_the_request_event() -> None:
    """While a test captures structlog's events, the line goes through structlog, not around it."""
    configure_logging(json=True)
    with structlog.testing.capture_logs() as logs:
        assert json_lines() is None
        _log_one()
    assert [entry["event"] for entry in logs] == ["request"]
    assert logs[0]["request_id"] == "abc-1"
    assert json_lines() is not None


def test_the_console_renderer_is_never_bypassed() -> None:
    """On a TTY-style console configuration every line goes through the chain."""
    configure_logging(json=False)
    assert json_lines() is None
