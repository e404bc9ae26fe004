"""Micro-benchmark: what the latency bands cost per request, with and without the nodes' figures.

Run: gateway bench latency_bands [--repeats 15]

A router over 3 providers of one model, as a worker builds it (in-memory store, no I/O). Each
scenario times the bands one request needs (`Router.bands`, the per-request path) in
microseconds per call, median over `--repeats` repeats of 20,000 calls:
- `samples, no hysteresis`: this worker's own samples banded as before this change;
- `samples`: the same samples with hysteresis and the staleness check;
- `node figures`: every provider's node publishes a TTFT histogram (the fleet view), remade
  once per poll round and looked up per request;
- `node figures, store down`: the coarse ranking a worker uses without the store.
Writes bench/results/latency_bands.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import timeit
from collections.abc import Callable
from typing import Any

import aiohttp

from affinity_store.memory_store import MemoryAffinityStore
from bench.harness import write_results
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.config_service import AffinitySettings
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.load import LoadPoller
from gateway.dispatch.permits import ProviderPermits
from gateway.selection.affinity import SharedAffinity
from gateway.selection.router import Router
from gateway.shared.metrics import Metrics

MODEL = "bands-model"
NODES = ("node-a", "node-b", "node-c")
CALLS = 20_000
NOW = 1000.0


def build(session: aiohttp.ClientSession) -> Router:
    """A router over three providers, with 200 own samples each."""
    settings = Settings.model_validate(
        {
            "providers": [
                {"name": name, "url": f"http://127.0.0.1:{9000 + index}", "models": {MODEL: MODEL}}
                for index, name in enumerate(NODES)
            ],
            "keys": [{"id": "key", "key_sha256": "0" * 64}],
        }
    )
    catalog = Catalog(settings)
    metrics = Metrics()
    permits = ProviderPermits(catalog.providers)
    health = ProviderHealth(
        settings.routing,
        serving={model: [p.name for p in ps] for model, ps in catalog.serving.items()},
    )
    poller = LoadPoller(
        session, catalog.providers, permits.in_flight, interval=1, clock=lambda: NOW
    )
    router = Router(
        catalog,
        settings.routing,
        spill=settings.affinity.spill,
        affinity=SharedAffinity(MemoryAffinityStore(), AffinitySettings(), metrics),
        health=health,
        permits=permits,
        load=poller,
        metrics=metrics,
        clock=lambda: NOW,
        seed=1,
    )
    for index, name in enumerate(NODES):
        for sample in range(200):
            router.latency.record(name, MODEL, 0.1 + 0.01 * index + 0.0001 * sample, NOW - 1)
    return router


def feed_node_figures(router: Router) -> None:
    """Two poll rounds of TTFT totals for every node."""
    poller = router._poller
    for index, name in enumerate(NODES):
        reading = poller.readings[name]
        reading.ttft.add(NOW - 5, 0.0, 0)
        reading.ttft.add(NOW, (0.1 + 0.01 * index) * 100, 100)
        reading.read_at = NOW
    poller.polls += 1


def median_microseconds(call: Callable[[], object], repeats: int) -> float:
    """Median microseconds per call over `repeats` timings of CALLS calls."""
    timings = timeit.repeat(call, number=CALLS, repeat=repeats)
    return round(statistics.median(timings) / CALLS * 1e6, 3)


async def run(repeats: int) -> dict[str, Any]:
    """Every scenario on one router."""
    names = list(NODES)
    async with aiohttp.ClientSession() as session:
        router = build(session)
        tracker = router.latency
        results = {
            "samples, no hysteresis": median_microseconds(
                lambda: tracker.bands(
                    MODEL, names, NOW, band_fraction=0.15, min_samples=20, enabled=True
                ),
                repeats,
            ),
            "samples": median_microseconds(lambda: router.bands(MODEL, names, NOW), repeats),
        }
        feed_node_figures(router)
        results["node figures"] = median_microseconds(
            lambda: router.bands(MODEL, names, NOW), repeats
        )
        results["node figures, store down"] = median_microseconds(
            lambda: router.bands(MODEL, names, NOW, shared_only=True), repeats
        )
    return results


def main() -> int:
    """Run, print, write."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    options = parser.parse_args()
    results = asyncio.run(run(options.repeats))
    for scenario, microseconds in results.items():
        print(f"{scenario:<28} {microseconds:8.3f} µs per request")
    write_results(
        "latency_bands",
        {"options": vars(options), "microseconds_per_request": results},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
