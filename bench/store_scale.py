"""Claim and look-up latency as the bindings table grows: 1k, 10k, 100k and 1M live bindings.

Run: gateway bench store_scale [--sizes 1000,10000,100000,1000000] [--claims N] [--lookups N]
                              [--scope key|conversation]
Starts a throwaway embedded Postgres, migrates it, fills the table to each size (with the
counters a real fleet would have kept), then times sequential claims of new keys and look-ups
of existing ones from one client. With `--scope conversation` every binding belongs to one
application key, one per conversation (`m#<digest>`), as `affinity.scope: conversation` writes
them. Prints a table and writes bench/results/store_scale.json (store_scale_conversation.json).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

from affinity_store.embedded import EmbeddedPostgres
from affinity_store.migrate import apply_migrations
from affinity_store.postgres import create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import Candidate, Spread
from bench.harness import write_results

CANDIDATES = [Candidate(f"node-{index}", f"node-{index}") for index in range(3)]
ACCEPTABLE = {candidate.provider for candidate in CANDIDATES}
AGREEMENT = Spread(share=0.1, minimum=2)
# What the router passes: a conversation's claim also weighs the nodes' caches and takes its
# key's spread-group lock, so one key's new conversations choose one at a time.
SPREAD = {
    "key": AGREEMENT,
    "conversation": Spread(
        share=0.1,
        minimum=2,
        weights={candidate.provider: 28_800.0 for candidate in CANDIDATES},
        group="app\nm",
    ),
}

FILL = {
    "key": """
INSERT INTO affinity_bindings (api_key_id, model, provider, routing_identity, expires_at)
SELECT 'filler-' || n, 'm', 'node-' || (n % 3), 'node-' || (n % 3), now() + interval '1 hour'
FROM generate_series($1::int, $2::int - 1) AS n
""",
    "conversation": """
INSERT INTO affinity_bindings (api_key_id, model, provider, routing_identity, expires_at)
SELECT 'app', 'm#' || md5('filler-' || n), 'node-' || (n % 3), 'node-' || (n % 3),
       now() + interval '1 hour'
FROM generate_series($1::int, $2::int - 1) AS n
""",
}
RECOUNT = """
INSERT INTO affinity_binding_counts (routing_identity, shard, bindings)
SELECT routing_identity, 0, count(*) FROM affinity_bindings GROUP BY routing_identity
"""


def percentiles(samples: list[float]) -> dict[str, float]:
    """Median and p99 in milliseconds."""
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 3),
    }


def binding(scope: str, name: str) -> tuple[str, str]:
    """The (key id, model) a binding named `name` has under `scope`."""
    if scope == "key":
        return name, "m"
    return "app", "m#" + hashlib.md5(name.encode()).hexdigest()  # noqa: S324 - a name, not a secret


async def fill_to(url: str, current: int, size: int, scope: str) -> None:
    """Add filler bindings up to `size` rows and set the counters to a full count."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute(FILL[scope], current, size)
        async with connection.transaction():
            await connection.execute("DELETE FROM affinity_binding_counts")
            await connection.execute(RECOUNT)
        await connection.execute("VACUUM ANALYZE affinity_bindings")
    finally:
        await connection.close()


async def measure_size(
    store: PostgresAffinityStore, size: int, claims: int, lookups: int, scope: str
) -> dict[str, dict[str, float]]:
    """Time claims of keys that have no binding yet, then look-ups of filler keys."""
    claim_samples = []
    for index in range(claims):
        started = time.perf_counter()
        await store.claim(
            *binding(scope, f"new-{size}-{index}"),
            acceptable=ACCEPTABLE,
            preferred=CANDIDATES,
            ttl_seconds=300,
            timeout=5,
            spread=SPREAD[scope],
        )
        claim_samples.append(time.perf_counter() - started)
    chooser = random.Random(size)
    lookup_samples = []
    for _ in range(lookups):
        key, model = binding(scope, f"filler-{chooser.randrange(size)}")
        started = time.perf_counter()
        await store.lookup(key, model, timeout=5)
        lookup_samples.append(time.perf_counter() - started)
    return {"claim": percentiles(claim_samples), "lookup": percentiles(lookup_samples)}


async def run(sizes: list[int], claims: int, lookups: int, scope: str) -> dict[str, object]:
    """Measure every size on one throwaway server, smallest first."""
    with tempfile.TemporaryDirectory(prefix="bench-store-scale-") as directory:
        server = EmbeddedPostgres(Path(directory) / "pgdata")
        server.start()
        try:
            pool = await create_pool(server.url, min_size=1, max_size=2, statement_cache_size=100)
            try:
                await apply_migrations(pool)
                store = PostgresAffinityStore(pool)
                results: dict[str, object] = {}
                current = 0
                for size in sizes:
                    await fill_to(server.url, current, size, scope)
                    current = size
                    results[str(size)] = await measure_size(store, size, claims, lookups, scope)
                    print(f"{size:>9} live bindings: {results[str(size)]}", flush=True)
                return results
            finally:
                await pool.close()
        finally:
            server.stop()


def main() -> None:
    """Parse flags, run, print the ratios and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--claims", type=int, default=500)
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--scope", choices=("key", "conversation"), default="key")
    options = parser.parse_args()
    sizes = sorted(int(size) for size in options.sizes.split(","))
    results = asyncio.run(run(sizes, options.claims, options.lookups, options.scope))
    smallest, largest = results[str(sizes[0])], results[str(sizes[-1])]
    assert isinstance(smallest, dict)
    assert isinstance(largest, dict)
    ratio = largest["claim"]["median_ms"] / smallest["claim"]["median_ms"]
    print(f"claim median at {sizes[-1]} / at {sizes[0]}: {ratio:.2f}x")
    path = write_results(
        "store_scale" if options.scope == "key" else "store_scale_conversation",
        {
            "scope": options.scope,
            "sizes": sizes,
            "claims_per_size": options.claims,
            "lookups_per_size": options.lookups,
            "results": results,
            "claim_median_ratio_largest_to_smallest": round(ratio, 3),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
