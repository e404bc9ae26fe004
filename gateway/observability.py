"""Logging set-up and the metrics registry the app owns (never prometheus-client's global one)."""

from __future__ import annotations

import logging
import sys

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Store calls have deadlines of tens to hundreds of milliseconds.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# TTFT and total duration of LLM calls range from milliseconds (cache hits) to minutes (long
# generations), so the buckets span 10 ms to 120 s roughly geometrically.
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip


def configure_logging(*, json: bool | None = None, level: str = "info") -> None:
    """JSON lines in production, a readable console on a TTY; one configuration per process."""
    use_json = not sys.stderr.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks if use_json else structlog.dev.set_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class Metrics:
    """Every metric family of one app, registered on the app's own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "gateway_requests",
            "Client requests answered, by resolved model, serving provider and status class.",
            ["model", "provider", "status_class"],
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from receiving a request to sending its last byte.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "gateway_ttft_seconds",
            "Time from receiving a request to the upstream's first body byte.",
            ["model", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.upstream_attempts = Counter(
            "gateway_upstream_attempts",
            "Attempts sent to providers, by outcome (ok, or the reason it failed).",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.affinity_results = Counter(
            "gateway_affinity_results",
            "Requests by how shared or session affinity decided their provider.",
            ["kind"],
            registry=self.registry,
        )
        self.store_latency = Histogram(
            "gateway_store_call_duration_seconds",
            "Affinity store calls by operation, circuit state when made, and outcome.",
            ["operation", "circuit", "outcome"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.store_up = Gauge(
            "gateway_affinity_store_up",
            "1 while the affinity store answers, 0 while this process routes on local state.",
            registry=self.registry,
        )
        self.renew_queue_depth = Gauge(
            "gateway_renew_queue_depth",
            "Renewals and rebinds waiting to be written.",
            registry=self.registry,
        )
        self.renew_drops = Counter(
            "gateway_renew_drops",
            "Renewals and rebinds dropped, by reason.",
            ["reason"],
            registry=self.registry,
        )
