"""The metrics an app owns (never prometheus-client's global registry), and multi-worker mode.

With several workers, every process writes its values to files in one directory
(prometheus-client's multiprocess mode) and any worker's `/metrics` reports them summed.
Gauges that mirror per-process state are refreshed from that state once a second.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Store calls have deadlines of tens to hundreds of milliseconds.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# TTFT and total duration of LLM calls range from milliseconds (cache hits) to minutes (long
# generations), so the buckets span 10 ms to 120 s roughly geometrically.
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip


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
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens the upstreams reported, by configured key id, model, provider and kind "
            "(prompt, completion, cached: prompt tokens served from the node's cache).",
            ["key", "model", "provider", "kind"],
            registry=self.registry,
        )
        self.upstream_attempts = Counter(
            "gateway_upstream_attempts",
            "Attempts sent to providers, by outcome (ok, or the reason it failed).",
            ["provider", "outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "gateway_retries",
            "Failover attempts beyond a request's first, made within the worker's retry budget.",
            registry=self.registry,
        )
        self.retries_refused = Counter(
            "gateway_retries_refused",
            "Failover retries not made though providers were left, by reason: budget (the "
            "worker's retry budget was spent), request_suspected (two providers failed the "
            "request alike).",
            ["reason"],
            registry=self.registry,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Config reloads by this worker, by result (applied, invalid, failed).",
            ["result"],
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
            "1 while the affinity store answers, 0 while a process routes on local state "
            "(across workers: the lowest).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.change_feed_verified = Gauge(
            "gateway_affinity_change_feed_verified",
            "1 while this worker hears every binding change (its copies of bindings live until "
            "a change), 0 while copies expire after local_cache_seconds (across workers: the "
            "lowest).",
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.renew_queue_depth = Gauge(
            "gateway_renew_queue_depth",
            "Renewals and rebinds waiting to be written.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.renew_drops = Counter(
            "gateway_renew_drops",
            "Renewals and rebinds dropped, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.provider_in_flight = Gauge(
            "gateway_provider_in_flight",
            "Requests in flight to a provider (summed over workers).",
            ["provider"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.provider_cooldown = Gauge(
            "gateway_provider_cooldown_seconds",
            "Seconds of cooldown left for a provider, 0 when it is not cooling "
            "(across workers: the longest).",
            ["provider"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.cooldowns_withheld = Counter(
            "gateway_cooldowns_withheld",
            "Runs of failures that earned a provider a cooldown withheld by "
            "routing.max_cooling_fraction: the provider stays in rotation while failing.",
            ["provider"],
            registry=self.registry,
        )
        self.provider_load = Gauge(
            "gateway_provider_load",
            "A provider's running + waiting requests as last polled, or in-flight requests "
            "where it reports none (across workers: the highest).",
            ["provider"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.provider_cache_tokens = Gauge(
            "gateway_provider_cache_tokens",
            "A provider's KV cache in tokens as new conversations' claims weigh it: its size, 0 "
            "when nearly full (it takes no new ones), -1 when it reports none.",
            ["provider"],
            registry=self.registry,
            multiprocess_mode="livemin",
        )
        self.requests_shed = Counter(
            "gateway_requests_shed",
            "New requests answered 503 (overloaded) by load shedding, before their body was read.",
            registry=self.registry,
        )
        self.queue_delay = Gauge(
            "gateway_queue_delay_seconds",
            "The smallest queueing delay of a request (the time between its head being read and "
            "its handler starting) over a worker's last load-shedding interval (across workers: "
            "the highest).",
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.key_units = Histogram(
            "gateway_key_unit_claim_seconds",
            "Requests whose key's concurrency share here was spent, asking the store for one more "
            "unit, by outcome (granted, at_limit, no_answer); the time the claim took.",
            ["outcome"],
            buckets=STORE_BUCKETS,
            registry=self.registry,
        )
        self.key_limit_refusals = Counter(
            "gateway_key_limit_refusals",
            "Requests refused by their key's limits, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.memory_budget = Gauge(
            "gateway_memory_budget_bytes",
            "A worker's memory budget for requests (server.memory_budget_bytes; across workers: "
            "the sum).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.memory_held = Gauge(
            "gateway_memory_held_bytes",
            "Bytes held in the memory budget now, by use: request_body, upload_copy, answer "
            "(across workers: the sum).",
            ["use"],
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.live_uploads = Gauge(
            "gateway_memory_live_uploads",
            "Uploads whose objects are still in memory: those being streamed, plus any a finished "
            "request left behind (a leak when it stays above 0 with no upload under way).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.memory_refusals = Counter(
            "gateway_memory_refusals",
            "Bytes the memory budget refused, counted once per refusal, by use and reason "
            "(worker: the budget was spent; key_share: the key's share was).",
            ["use", "reason"],
            registry=self.registry,
        )
        self.latency_band = Gauge(
            "gateway_latency_band",
            "A provider's latency band for a model: 0 near the mean, positive slower "
            "(across workers: the worst).",
            ["provider", "model"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.latency_source = Gauge(
            "gateway_latency_source",
            "1 for where a provider's latency band comes from: `node` (the node's own TTFT "
            "histogram), `own` (this worker's samples) or `none` (no fresh figure: band 0); "
            "0 for the other two.",
            ["provider", "source"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )
        self.latency_age = Gauge(
            "gateway_latency_age_seconds",
            "Age of the newest figure a provider's latency band comes from; 0 with source "
            "`none` (across workers: the oldest).",
            ["provider"],
            registry=self.registry,
            multiprocess_mode="livemax",
        )


def exposition(metrics: Metrics, directory: str | None) -> bytes:
    """The Prometheus text for one scrape: this app's registry, or every worker's files."""
    if directory is None:
        return generate_latest(metrics.registry)
    registry = CollectorRegistry()
    # prometheus-client leaves this constructor unannotated.
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
