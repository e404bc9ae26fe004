"""Polled upstream figures (vLLM's running + waiting requests, and its time-to-first-token
histogram), and the spill rule built on the load."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
import structlog

from gateway.catalog import Provider
from gateway.config_service import SpillSettings
from gateway.routing.node_latency import NodeTtft
from gateway.shared.background import every, stop_task

logger = structlog.get_logger("gateway.dispatch.load")

LOAD_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")
# The TTFT histogram's running totals, as vLLM and SGLang name them.
TTFT_SUMS = ("vllm:time_to_first_token_seconds_sum", "sglang:time_to_first_token_seconds_sum")
TTFT_COUNTS = ("vllm:time_to_first_token_seconds_count", "sglang:time_to_first_token_seconds_count")
_TTFT_METRICS = (*TTFT_SUMS, *TTFT_COUNTS)
# KV-cache usage: vLLM v1's name, and v0's (still in older builds).
CACHE_USAGE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
CACHE_CONFIG_METRIC = "vllm:cache_config_info"
# Whole label names only: vLLM also reports `effective_attention_block_size` and the like.
_CACHE_CONFIG_LABELS = re.compile(r'(?:^|[{,])(num_gpu_blocks|block_size)="([0-9]+)"')
# A node whose running sequences hold this share of its KV cache takes no new conversations.
CACHE_FULL_USAGE = 0.9
MAX_METRICS_BYTES = 4 * 1024 * 1024
# A reading older than this many poll intervals is stale: fall back to local in-flight counts.
STALE_AFTER_INTERVALS = 3


@dataclass
class Reading:
    """The last load a provider reported, and how its polls are going."""

    load: float | None = None
    read_at: float = 0.0
    consecutive_failures: int = 0
    ttft: NodeTtft = field(default_factory=NodeTtft)
    cache_tokens: float | None = None
    cache_usage: float | None = None


@dataclass(frozen=True, slots=True)
class NodeFigures:
    """What one `/metrics` page says: the load, the TTFT histogram's running totals (each
    summed over label sets), the KV cache's size in tokens (summed over engines) and its usage
    (the fullest engine's); None where the page has none."""

    load: float | None
    ttft_seconds: float | None
    ttft_count: float | None
    cache_tokens: float | None = None
    cache_usage: float | None = None


def _cache_tokens(line: str) -> float | None:
    """Tokens one engine's KV cache holds, from a `vllm:cache_config_info` line's labels."""
    labels = dict(_CACHE_CONFIG_LABELS.findall(line.split("}", 1)[0]))
    if "num_gpu_blocks" not in labels or "block_size" not in labels:
        return None  # vLLM reports `None` blocks before the cache is sized
    return float(int(labels["num_gpu_blocks"]) * int(labels["block_size"]))


def parse_node_metrics(text: str) -> NodeFigures:
    """Read the load (running + waiting), the TTFT totals and the KV cache's size and usage
    from a Prometheus text page."""
    sums: dict[str, float] = {}
    usage: float | None = None
    for line in text.splitlines():
        if not line.startswith(("vllm:", "sglang:")):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name == CACHE_CONFIG_METRIC:
            tokens = _cache_tokens(line)
            if tokens is not None:
                sums["cache"] = sums.get("cache", 0.0) + tokens
            continue
        if (
            name not in LOAD_METRICS
            and name not in _TTFT_METRICS
            and name not in CACHE_USAGE_METRICS
        ):
            continue
        after_labels = line.rsplit("}", 1)[1] if "}" in line else line[len(name) :]
        fields = after_labels.split()
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            continue
        if name in CACHE_USAGE_METRICS:
            usage = value if usage is None else max(usage, value)
            continue
        group = "load" if name in LOAD_METRICS else "sum" if name in TTFT_SUMS else "count"
        sums[group] = sums.get(group, 0.0) + value
    return NodeFigures(
        sums.get("load"), sums.get("sum"), sums.get("count"), sums.get("cache"), usage
    )


class LoadPoller:
    """Polls every provider's `/metrics` in the background; never on a request's path."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        providers: Mapping[str, Provider],
        in_flight: Callable[[str], int],
        *,
        interval: float,
        ttft_window_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
        self._ttft_window_seconds = ttft_window_seconds
        self.polls = 0
        """Completed poll rounds: derived views recompute when it moves."""
        self._providers = providers
        self._in_flight = in_flight
        self._interval = interval
        self._clock = clock
        self.readings: dict[str, Reading] = {name: Reading() for name in providers}
        self._task: asyncio.Task[None] | None = None

    def track(self, providers: Mapping[str, Provider]) -> None:
        """Poll these providers from now on (a reload); readings of those that stay are kept."""
        self._providers = providers
        self.readings = {name: self.readings.get(name) or Reading() for name in providers}

    def load(self, provider: str) -> float:
        """The provider's load: its fresh polled reading, else this process's in-flight count."""
        reading = self.readings.get(provider)
        if reading is not None and reading.load is not None and self.is_polled(provider):
            return reading.load
        return float(self._in_flight(provider))

    def is_polled(self, provider: str) -> bool:
        """Whether the provider's load comes from a fresh poll (not the in-flight fallback)."""
        reading = self.readings.get(provider)
        return (
            reading is not None
            and reading.load is not None
            and self._clock() - reading.read_at <= self._interval * STALE_AFTER_INTERVALS
        )

    def cache_capacity(self, provider: str) -> float | None:
        """The node's KV cache as a claim weighs it: its size in tokens, 0 when it is nearly
        full (its running sequences hold `CACHE_FULL_USAGE` of it: a new conversation would
        evict the bound ones' prefixes), None when its polls are stale or it reports no size."""
        reading = self.readings.get(provider)
        if reading is None or reading.cache_tokens is None or not self.is_polled(provider):
            return None
        usage = reading.cache_usage
        return 0.0 if usage is not None and usage >= CACHE_FULL_USAGE else reading.cache_tokens

    def node_ttft(self, provider: str) -> float | None:
        """The node's own mean time to first token over the TTFT window; None when its polls
        are stale or it started no request in the window."""
        reading = self.readings.get(provider)
        if reading is None:
            return None
        return reading.ttft.mean(
            self._clock(), self._ttft_window_seconds, self._interval * STALE_AFTER_INTERVALS
        )

    def publishes_ttft(self, provider: str) -> bool:
        """Whether the provider's node publishes a TTFT histogram that is read fresh."""
        reading = self.readings.get(provider)
        return reading is not None and reading.ttft.fresh(
            self._clock(), self._interval * STALE_AFTER_INTERVALS
        )

    def node_ttft_age(self, provider: str) -> float | None:
        """Seconds since the node's TTFT totals were last read; None if never."""
        reading = self.readings.get(provider)
        if reading is None or not reading.ttft.readings:
            return None
        return self._clock() - reading.ttft.readings[-1][0]

    async def start(self) -> None:
        """Start polling."""
        self._task = asyncio.create_task(self._run(), name="load-poller")

    async def stop(self) -> None:
        """Stop polling."""
        await stop_task(self._task)
        self._task = None

    async def poll_once(self) -> None:
        """Poll every provider concurrently, each bounded by the poll interval."""
        await asyncio.gather(*(self._poll(provider) for provider in self._providers.values()))
        self.polls += 1

    async def _run(self) -> None:
        """A poll at once, then one every poll interval."""
        await every("load-poller", self.poll_once, interval=self._interval)

    async def _poll(self, provider: Provider) -> None:
        # A reload may replace the readings while this poll runs: it updates the one it started.
        reading = self.readings.get(provider.name) or Reading()
        try:
            async with (
                asyncio.timeout(min(self._interval, 1.0)),
                self._session.get(provider.base_url + "/metrics") as response,
            ):
                if response.status != 200:
                    raise ValueError(f"status {response.status}")
                body = await response.content.read(MAX_METRICS_BYTES)
            figures = parse_node_metrics(body.decode("utf-8", errors="replace"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            reading.consecutive_failures += 1
            if reading.consecutive_failures == 1:
                logger.info("load_poll_failed", provider=provider.name, error=type(error).__name__)
            return
        now = self._clock()
        reading.consecutive_failures = 0
        reading.load = figures.load
        reading.read_at = now
        reading.cache_tokens = figures.cache_tokens
        reading.cache_usage = figures.cache_usage
        if figures.ttft_seconds is not None and figures.ttft_count is not None:
            reading.ttft.add(now, figures.ttft_seconds, figures.ttft_count)


def should_spill(
    bound: str, others: list[str], load: Callable[[str], float], spill: SpillSettings
) -> bool:
    """Skip the bound provider for one request when it is loaded both absolutely and relatively."""
    if not others:
        return False
    bound_load = load(bound)
    least = min(load(name) for name in others)
    return bound_load > spill.min_load and bound_load > spill.ratio * least
