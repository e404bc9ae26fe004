"""vLLM-style Prometheus metrics, read from the node's state at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric

from gateway.simulator.engine import TTFT_BUCKETS
from gateway.simulator.state import SimulatorState

LABELS = ("model_name", "engine")
BLOCK_SIZE = 16
"""The block size the node reports in `vllm:cache_config_info` (vLLM's default)."""


class SimulatorCollector:
    """Yields vLLM's engine metrics (labels `model_name` and `engine`, as vLLM v1 has them)."""

    def __init__(self, state: SimulatorState) -> None:
        """Read from `state` on every scrape."""
        self._state = state

    def collect(self) -> Iterator[Metric]:
        """The current values; `extra_waiting` is added to the waiting gauge to fake load, and
        `kv_cache_usage` replaces the KV-cache usage when set."""
        state = self._state
        engine = state.engine
        labels = [state.metrics_model_name, "0"]
        running = GaugeMetricFamily(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            labels=LABELS,
        )
        running.add_metric(labels, engine.running)
        yield running
        waiting = GaugeMetricFamily(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            labels=LABELS,
        )
        waiting.add_metric(labels, engine.waiting + state.faults.extra_waiting)
        yield waiting
        usage = GaugeMetricFamily(
            "vllm:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.", labels=LABELS
        )
        capacity = engine.cache.capacity_tokens
        reported = state.faults.kv_cache_usage
        if reported is None:
            # As vLLM counts it: the blocks running sequences hold (cached blocks no running
            # sequence uses are free to evict, so they do not count).
            reported = min(1.0, engine.held_tokens / capacity) if capacity else 0.0
        usage.add_metric(labels, reported)
        yield usage
        # vLLM's cache configuration as an info gauge (labels hold the values, the value is 1).
        config = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=("block_size", "num_gpu_blocks", "enable_prefix_caching", "engine"),
        )
        config.add_metric([str(BLOCK_SIZE), str(capacity // BLOCK_SIZE), "True", "0"], 1.0)
        yield config
        counters = (
            (
                "vllm:prefix_cache_queries",
                "Prefix-cache queries, in tokens.",
                engine.prefix_cache_queries_total,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prefix-cache hits, in tokens.",
                engine.prefix_cache_hits_total,
            ),
            ("vllm:prompt_tokens", "Prefill tokens processed.", engine.prompt_tokens_total),
            (
                "vllm:generation_tokens",
                "Generation tokens processed.",
                engine.generation_tokens_total,
            ),
        )
        for name, documentation, value in counters:
            counter = CounterMetricFamily(name, documentation, labels=LABELS)
            counter.add_metric(labels, value)
            yield counter
        finished = CounterMetricFamily(
            "vllm:request_success",
            "Finished requests by finish reason.",
            labels=(*LABELS, "finished_reason"),
        )
        for reason, count in sorted(engine.finished_total.items()):
            finished.add_metric([*labels, reason], count)
        yield finished
        ttft = HistogramMetricFamily(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels=LABELS,
        )
        cumulative = 0
        buckets = []
        for bound, count in zip(
            (*TTFT_BUCKETS, float("inf")), engine.ttft.bucket_counts, strict=True
        ):
            cumulative += count
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        ttft.add_metric(labels, buckets, engine.ttft.total_seconds)
        yield ttft


def metrics_registry(state: SimulatorState) -> CollectorRegistry:
    """A registry of its own (never the global one) holding the node's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SimulatorCollector(state))
    return registry


def render_metrics(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(registry)
