"""One finished request, recorded: the status page's recent decisions, metrics, one log line."""

from __future__ import annotations

import time
from collections import deque

import structlog

from gateway.catalog import Key
from gateway.dispatch import DispatchRecord
from gateway.metrics import Metrics
from gateway.status import RecentDecision

logger = structlog.get_logger("gateway.proxy")


def record_request(
    metrics: Metrics,
    recent: deque[RecentDecision],
    *,
    request_id: str,
    affinity: str,
    route: list[str],
    key: Key | None,
    requested: str | None,
    model: str | None,
    record: DispatchRecord,
    status: int,
    started_at: float,
) -> None:
    """Add the request to the recent decisions, count it in the metrics and log its line."""
    duration = time.monotonic() - started_at
    attempts = [f"{attempt.provider}:{attempt.outcome}" for attempt in record.attempts]
    served = record.served.name if record.served else None
    recent.append(
        RecentDecision(
            at=time.time(),
            request_id=request_id,
            key_id=key.id if key else None,
            model=model,
            provider=served,
            affinity=affinity,
            attempts=tuple(attempts),
            status=status,
            duration_ms=round(duration * 1000, 1),
        )
    )
    if route:  # a routing decision was made: count how stickiness turned out
        metrics.affinity_results.labels(affinity).inc()
    if model is not None:
        metrics.requests.labels(model, served or "none", f"{status // 100}xx").inc()
        metrics.request_duration.labels(model).observe(duration)
        if served is not None and record.ttft_seconds is not None:
            metrics.ttft.labels(model, served).observe(record.ttft_seconds)
        for attempt in record.attempts:
            metrics.upstream_attempts.labels(attempt.provider, attempt.outcome).inc()
    logger.info(
        "request",
        request_id=request_id,
        key_id=key.id if key else None,
        org=key.org if key else None,
        requested_model=requested if model else None,
        model=model,
        provider=served,
        affinity=affinity,
        route=route,
        attempts=attempts,
        status=status,
        client_disconnected=record.client_disconnected,
        duration_ms=round(duration * 1000, 2),
        ttft_ms=round(record.ttft_seconds * 1000, 2) if record.ttft_seconds else None,
        bytes=record.bytes_sent,
    )
