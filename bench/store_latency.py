"""Median lookup and claim latency of the Postgres affinity store against embedded Postgres.

Run: .venv/bin/python -m bench.store_latency [--lookups N] [--claims N] [--output FILE]
Starts a throwaway embedded Postgres (durable, default settings), migrates it, times
sequential calls from one client, prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from affinity_store.embedded import EmbeddedPostgres
from affinity_store.migrate import apply_migrations
from affinity_store.postgres import create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import Candidate

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "store_latency.json"
CANDIDATES = [Candidate(f"node-{index}", f"node-{index}") for index in range(3)]
ACCEPTABLE = {candidate.provider for candidate in CANDIDATES}


def summarise(samples: list[float]) -> dict[str, float]:
    """Return count and median/p90/p99/max in milliseconds."""
    ordered = sorted(samples)

    def percentile(fraction: float) -> float:
        """Return the sample at `fraction` of the ordered list, in milliseconds."""
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000

    return {
        "count": len(ordered),
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": percentile(0.90),
        "p99_ms": percentile(0.99),
        "max_ms": ordered[-1] * 1000,
    }


async def time_calls(count: int, call: Callable[[int], Awaitable[object]]) -> list[float]:
    """Time `count` sequential calls, passing each its index."""
    samples = []
    for index in range(count):
        started = time.perf_counter()
        await call(index)
        samples.append(time.perf_counter() - started)
    return samples


async def measure(url: str, lookups: int, claims: int) -> dict[str, dict[str, float]]:
    """Measure hit lookups, misses that claim a new key, and claims that find a binding."""
    pool = await create_pool(url, min_size=2, max_size=2, statement_cache_size=100)
    try:
        await apply_migrations(pool)
        store = PostgresAffinityStore(pool)

        async def claim(key: str) -> object:
            """Claim `key` among the three nodes."""
            return await store.claim(
                key, "m", acceptable=ACCEPTABLE, preferred=CANDIDATES, ttl_seconds=300, timeout=5
            )

        await time_calls(100, lambda index: claim(f"warm-{index}"))
        new_claims = await time_calls(claims, lambda index: claim(f"key-{index}"))
        existing_claims = await time_calls(claims, lambda index: claim(f"key-{index}"))
        hits = await time_calls(
            lookups, lambda index: store.lookup(f"key-{index % claims}", "m", timeout=5)
        )
        misses = await time_calls(
            lookups, lambda index: store.lookup(f"absent-{index}", "m", timeout=5)
        )
    finally:
        await pool.close()
    return {
        "lookup_hit": summarise(hits),
        "lookup_miss": summarise(misses),
        "claim_new_binding": summarise(new_claims),
        "claim_existing_binding": summarise(existing_claims),
    }


def main() -> None:
    """Parse arguments, run the measurement on a fresh embedded Postgres, report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--claims", type=int, default=1000)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="store-latency-") as directory:
        server = EmbeddedPostgres(Path(directory) / "pgdata")
        with server:
            results = asyncio.run(measure(server.url, arguments.lookups, arguments.claims))
    report = {
        "benchmark": "store_latency",
        "database": "embedded Postgres, default durable settings, TCP loopback",
        "client": "one asyncpg pool of 2, sequential calls, statement cache 100",
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "results": results,
    }
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'operation':<24}{'median ms':>11}{'p90 ms':>9}{'p99 ms':>9}")
    for operation, summary in results.items():
        print(
            f"{operation:<24}{summary['median_ms']:>11.3f}"
            f"{summary['p90_ms']:>9.3f}{summary['p99_ms']:>9.3f}"
        )
    print(f"written to {arguments.output}")


if __name__ == "__main__":
    main()
