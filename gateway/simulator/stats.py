"""What the node saw, for tests: counters, peaks and a bounded ring of recent requests.

Times are `time.monotonic()` readings, so a test process on the same machine can compare
them with its own clock (CLOCK_MONOTONIC is shared by every process of one boot).
"""

from __future__ import annotations

import base64
import time
from collections import deque
from typing import Any

from gateway.simulator.engine import Engine


class Outcome:
    """How a completion request ended, as recorded in its `outcome` field."""

    COMPLETED = "completed"
    CANCELLED = "cancelled"
    DROPPED = "dropped"
    ERROR = "error"
    RATE_LIMITED = "rate_limited"
    HOSTILE = "hostile"
    REJECTED = "rejected"


class RequestRecord:
    """One completion request as received, and when each step of answering it happened."""

    __slots__ = (
        "body",
        "cached_tokens",
        "finished_at",
        "first_token_at",
        "generation_finished_at",
        "method",
        "outcome",
        "path",
        "prompt_tokens",
        "raw_headers",
        "received_at",
        "request_id",
        "status",
    )

    def __init__(
        self,
        request_id: str,
        method: str,
        path: str,
        raw_headers: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        """Record the request's arrival now."""
        self.request_id = request_id
        self.method = method
        self.path = path
        self.raw_headers = raw_headers
        self.body = b""
        self.received_at = time.monotonic()
        self.first_token_at: float | None = None
        self.generation_finished_at: float | None = None
        self.finished_at: float | None = None
        self.outcome: str | None = None
        self.status: int | None = None
        self.prompt_tokens: int | None = None
        self.cached_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready mapping; the body is base64 so it survives byte for byte."""
        return {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "headers": [
                [name.decode("latin-1"), value.decode("latin-1")]
                for name, value in self.raw_headers
            ],
            "body_base64": base64.b64encode(self.body).decode("ascii"),
            "received_at": self.received_at,
            "first_token_at": self.first_token_at,
            "generation_finished_at": self.generation_finished_at,
            "finished_at": self.finished_at,
            "outcome": self.outcome,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
        }


class SimulatorStats:
    """Counters since the last reset; prefix-cache figures are engine totals minus a baseline."""

    def __init__(self, engine: Engine, recent_capacity: int) -> None:
        """Start with everything at zero."""
        self._engine = engine
        self._recent: deque[RequestRecord] = deque(maxlen=recent_capacity)
        self.received = 0
        self.received_by_path: dict[str, int] = {}
        self.outcomes: dict[str, int] = {}
        self.in_flight = 0
        self.peak_in_flight = 0
        self.last_cancelled_at: float | None = None
        self._prefix_queries_baseline = engine.prefix_cache_queries_total
        self._prefix_hits_baseline = engine.prefix_cache_hits_total

    def count_path(self, path: str) -> None:
        """Count a request to a path that is not a completion endpoint."""
        self.received += 1
        self.received_by_path[path] = self.received_by_path.get(path, 0) + 1

    def completion_started(self, record: RequestRecord) -> None:
        """Count a completion request as received and in flight, and remember it."""
        self.count_path(record.path)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self._recent.append(record)

    def completion_finished(self, record: RequestRecord, outcome: str, status: int | None) -> None:
        """Count how a completion request ended; the first outcome recorded for it wins."""
        if record.finished_at is not None:
            return
        record.finished_at = time.monotonic()
        record.outcome = outcome
        record.status = status
        self.in_flight -= 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if outcome == Outcome.CANCELLED:
            self.last_cancelled_at = record.finished_at

    def reset(self) -> None:
        """Zero the counters and forget recent requests; requests in flight stay counted."""
        self._recent.clear()
        self.received = 0
        self.received_by_path = {}
        self.outcomes = {}
        self.peak_in_flight = self.in_flight
        self.last_cancelled_at = None
        self._prefix_queries_baseline = self._engine.prefix_cache_queries_total
        self._prefix_hits_baseline = self._engine.prefix_cache_hits_total
        self._engine.reset_peaks()

    def to_json(self) -> dict[str, Any]:
        """The stats as a JSON-ready mapping."""
        engine = self._engine
        return {
            "monotonic_now": time.monotonic(),
            "requests_received": self.received,
            "requests_by_path": dict(self.received_by_path),
            "completed": self.outcomes.get(Outcome.COMPLETED, 0),
            "cancelled": self.outcomes.get(Outcome.CANCELLED, 0),
            "outcomes": dict(self.outcomes),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "running": engine.running,
            "waiting": engine.waiting,
            "peak_running": engine.peak_running,
            "peak_waiting": engine.peak_waiting,
            "prefix_cache_queries": engine.prefix_cache_queries_total
            - self._prefix_queries_baseline,
            "prefix_cache_hits": engine.prefix_cache_hits_total - self._prefix_hits_baseline,
            "prefix_cache_used_tokens": engine.cache.used_tokens,
            "last_cancelled_at": self.last_cancelled_at,
            "recent_requests": [record.to_json() for record in self._recent],
        }
