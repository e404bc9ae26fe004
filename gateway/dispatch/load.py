"""Polled upstream load (vLLM's running + waiting requests), and the spill rule built on it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import structlog

from gateway.background import stop_task
from gateway.catalog import Provider
from gateway.config import SpillSettings

logger = structlog.get_logger("gateway.dispatch.load")

LOAD_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting")
MAX_METRICS_BYTES = 4 * 1024 * 1024
# A reading older than this many poll intervals is stale: fall back to local in-flight counts.
STALE_AFTER_INTERVALS = 3


@dataclass
class Reading:
    """The last load a provider reported, and how its polls are going."""

    load: float | None = None
    read_at: float = 0.0
    consecutive_failures: int = 0


def parse_load(text: str) -> float | None:
    """running + waiting from a Prometheus text page, summed over label sets; None if absent."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if not line.startswith(LOAD_METRICS):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name not in LOAD_METRICS:
            continue
        after_labels = line.rsplit("}", 1)[1] if "}" in line else line[len(name) :]
        fields = after_labels.split()
        try:
            total += float(fields[0])
        except (IndexError, ValueError):
            continue
        found = True
    return total if found else None


class LoadPoller:
    """Polls every provider's `/metrics` in the background; never on a request's path."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        providers: Mapping[str, Provider],
        in_flight: Callable[[str], int],
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._session = session
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

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._interval)

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
            load = parse_load(body.decode("utf-8", errors="replace"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            reading.consecutive_failures += 1
            if reading.consecutive_failures == 1:
                logger.info("load_poll_failed", provider=provider.name, error=type(error).__name__)
            return
        reading.consecutive_failures = 0
        reading.load = load
        reading.read_at = self._clock()


def should_spill(
    bound: str, others: list[str], load: Callable[[str], float], spill: SpillSettings
) -> bool:
    """Skip the bound provider for one request when it is loaded both absolutely and relatively."""
    if not others:
        return False
    bound_load = load(bound)
    least = min(load(name) for name in others)
    return bound_load > spill.min_load and bound_load > spill.ratio * least
