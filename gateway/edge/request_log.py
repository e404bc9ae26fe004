"""One finished request, recorded: the status page's recent decisions, metrics, one log line."""

from __future__ import annotations

import time

import structlog

from affinity_store.usage import UsageKey
from gateway.catalog import Key
from gateway.dispatch.job import DispatchRecord
from gateway.dispatch.usage import Usage
from gateway.dispatch.usage_book import UsageBook
from gateway.shared.decisions import RecentDecisions
from gateway.shared.metric_children import Children
from gateway.shared.metrics import Metrics
from gateway.shared.observability import json_lines

logger = structlog.get_logger("gateway.edge.proxy")

# The `model` label of requests to endpoints that name no model (a stored response by id).
NO_MODEL_LABEL = ""


class RequestMetrics:
    """The per-request metric families of an app, their children resolved once per labels."""

    def __init__(self, metrics: Metrics) -> None:
        self.requests = Children(metrics.requests)
        self.duration = Children(metrics.request_duration)
        self.ttft = Children(metrics.ttft)
        self.attempts = Children(metrics.upstream_attempts)
        self.affinity = Children(metrics.affinity_results)
        self.tokens = Children(metrics.tokens)


def outcome_of(record: DispatchRecord) -> str:
    """How a request ended, for its usage rollup: ok, cancelled (by the client), or error."""
    if record.client_disconnected:
        return "cancelled"
    return "ok" if record.succeeded else "error"


def record_request(
    metrics: RequestMetrics,
    recent: RecentDecisions,
    *,
    request_id: str,
    affinity: str,
    route: list[str],
    key: Key | None,
    requested: str | None,
    model: str | None,
    names_no_model: bool,
    record: DispatchRecord,
    status: int,
    started_at: float,
    usage_book: UsageBook | None = None,
) -> None:
    """Add the request to the recent decisions, count it in the metrics and log its line.

    A request is counted once its model is resolved; one to an endpoint that names no model
    (`GET`/`DELETE /v1/responses/{id}`) once its key is known, with the model label `""`.
    With a usage book, it also goes into the book by outcome with the tokens its answer
    reported (what a broken or cut stream reported before it ended), and the tokens into
    `gateway_tokens_total` by key id.
    """
    duration = time.monotonic() - started_at
    attempts = [f"{attempt.provider}:{attempt.outcome}" for attempt in record.attempts]
    served = record.served.name if record.served else None
    # RecentDecision's fields: at, request id, key id, model, provider, affinity, attempts,
    # status, duration in ms.
    recent.add(
        (
            time.time(),
            request_id,
            key.id if key else None,
            model,
            served,
            affinity,
            tuple(attempts),
            status,
            round(duration * 1000, 1),
        )
    )
    if route:  # a routing decision was made: count how stickiness turned out
        metrics.affinity.of(affinity).inc()
    label = model if model is not None else None
    if label is None and names_no_model and key is not None:
        label = NO_MODEL_LABEL
    if label is not None:
        metrics.requests.of(label, served or "none", f"{status // 100}xx").inc()
        metrics.duration.of(label).observe(duration)
        if served is not None and record.ttft_seconds is not None:
            metrics.ttft.of(label, served).observe(record.ttft_seconds)
        for attempt in record.attempts:
            metrics.attempts.of(attempt.provider, attempt.outcome).inc()
        if usage_book is not None and key is not None:
            provider = served or "none"
            usage = record.usage
            usage_book.add(UsageKey(key.id, label, provider, outcome_of(record)), usage)
            if usage is not None:
                count_tokens(metrics, key.id, label, provider, usage)
    fields = {
        "request_id": request_id,
        "key_id": key.id if key else None,
        "org": key.org if key else None,
        "requested_model": requested if model else None,
        "model": model,
        "provider": served,
        "affinity": affinity,
        "route": route,
        "attempts": attempts,
        "status": status,
        "client_disconnected": record.client_disconnected,
        "duration_ms": round(duration * 1000, 2),
        "ttft_ms": round(record.ttft_seconds * 1000, 2) if record.ttft_seconds else None,
        "bytes": record.bytes_sent,
    }
    if record.failover_stopped is not None:
        # Providers were left, but no retry was made: the budget, or the request was the suspect.
        fields["failover_stopped"] = record.failover_stopped
    lines = json_lines()
    if lines is not None:  # the production chain: the same line, written without running it
        lines.info("request", fields)
    else:
        logger.info("request", **fields)


def count_tokens(
    metrics: RequestMetrics, key_id: str, model: str, provider: str, usage: Usage
) -> None:
    """Add an answer's tokens to `gateway_tokens_total` (kinds with none are not touched)."""
    for kind, count in (
        ("prompt", usage.prompt_tokens),
        ("completion", usage.completion_tokens),
        ("cached", usage.cached_tokens),
    ):
        if count:
            metrics.tokens.of(key_id, model, provider, kind).inc(count)
