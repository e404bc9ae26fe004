"""Store statements per request at scale: N active (key, model) pairs, each sending a request
every 30 s to a random one of W gateway workers, with and without the change feed.

Run: gateway bench store_statements [--pairs 100000] [--workers 2] [--minutes 15] [--warm-up 5]
                                   [--scope key|conversation]
Each worker is the real `SharedAffinity` (its own pool, cache, renewal queue and, in `notify`
mode, its own LISTEN connection) against a throwaway embedded Postgres; only the gateway's clock
is simulated, so 15 minutes of traffic take far less. Every pair is bound before the run, with
the expiries of a fleet in steady state (0-300 s left); counted after a warm-up in which every
worker sees nearly every pair once (those first look-ups are a worker's start-up cost): every
call the workers make to the store (look-up, claim, batched renewal, rebind). `expire` mode is the
plain 5 s local cache, measured on a tenth of the pairs (its ratio does not depend on the count).
With `--scope conversation` the pairs are one application key's conversations (`m#<n>`), as
`affinity.scope: conversation` binds them. Prints a table and writes
bench/results/store_statements.json (store_statements_conversation.json).
"""

# The store contract names its deadline parameter `timeout`; the counting twin keeps that name.
# ruff: noqa: ASYNC109

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path

import asyncpg

from affinity_store.embedded import EmbeddedPostgres
from affinity_store.migrate import apply_migrations
from affinity_store.notifications import BindingChanges
from affinity_store.postgres import Pool, create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import LEAST_BOUND, Binding, Candidate, Renewal, Spread
from bench.harness import write_results
from gateway.config_service import AffinitySettings
from gateway.selection.affinity import SharedAffinity
from gateway.shared.metrics import Metrics

PERIOD_SECONDS = 30
CONCURRENCY = 64
NODES = [Candidate(f"node-{index}", f"node-{index}") for index in range(3)]
FILL = {
    "key": """
INSERT INTO affinity_bindings (api_key_id, model, provider, routing_identity, expires_at)
SELECT 'key-' || n, 'm', 'node-' || (n % 3), 'node-' || (n % 3),
       now() + random() * interval '300 seconds'
FROM generate_series(0, $1::int - 1) AS n
""",
    "conversation": """
INSERT INTO affinity_bindings (api_key_id, model, provider, routing_identity, expires_at)
SELECT 'app', 'm#' || n, 'node-' || (n % 3), 'node-' || (n % 3),
       now() + random() * interval '300 seconds'
FROM generate_series(0, $1::int - 1) AS n
""",
}


def pair_of(scope: str, pair: int) -> tuple[str, str]:
    """The (key id, model) of pair number `pair` under `scope`."""
    return (f"key-{pair}", "m") if scope == "key" else ("app", f"m#{pair}")


class CountingStore(PostgresAffinityStore):
    """The Postgres store, counting the calls a worker makes."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool)
        self.calls: Counter[str] = Counter()

    async def lookup(self, api_key_id: str, model: str, *, timeout: float) -> Binding | None:
        self.calls["lookup"] += 1
        return await super().lookup(api_key_id, model, timeout=timeout)

    async def claim(
        self,
        api_key_id: str,
        model: str,
        *,
        acceptable: Collection[str],
        preferred: Sequence[Candidate],
        ttl_seconds: float,
        timeout: float,
        spread: Spread = LEAST_BOUND,
    ) -> Binding:
        self.calls["claim"] += 1
        return await super().claim(
            api_key_id,
            model,
            acceptable=acceptable,
            preferred=preferred,
            ttl_seconds=ttl_seconds,
            timeout=timeout,
            spread=spread,
        )

    async def renew_many(
        self, renewals: Collection[Renewal], *, ttl_seconds: float, timeout: float
    ) -> set[tuple[str, str]]:
        self.calls["renew_many"] += 1
        return await super().renew_many(renewals, ttl_seconds=ttl_seconds, timeout=timeout)

    async def rebind(
        self,
        api_key_id: str,
        model: str,
        *,
        old_provider: str,
        new: Candidate,
        ttl_seconds: float,
        timeout: float,
    ) -> bool:
        self.calls["rebind"] += 1
        return await super().rebind(
            api_key_id,
            model,
            old_provider=old_provider,
            new=new,
            ttl_seconds=ttl_seconds,
            timeout=timeout,
        )


class VirtualClock:
    """The gateway's monotonic clock, moved by the benchmark, and sleeps measured by it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Return once the simulated clock has moved on by `seconds`."""
        until = self.now + seconds
        while self.now < until:  # noqa: ASYNC110 - the benchmark moves the clock by hand
            await asyncio.sleep(0.001)


async def serve(affinity: SharedAffinity, key: str, model: str) -> None:
    """What the router does for one request of a shared-stickiness model, then a success."""
    lookup = await affinity.lookup(key, model)
    bound = lookup.binding
    if bound is None:
        bound = (
            await affinity.claim(
                key, model, preferred=NODES, acceptable=[n.provider for n in NODES]
            )
        ).binding
    if bound is not None:
        affinity.served(
            key, model, bound=bound, served=Candidate(bound.provider, bound.routing_identity)
        )


async def run_mode(
    url: str,
    mode: str,
    *,
    pairs: int,
    workers: int,
    minutes: float,
    warm_up: float,
    scope: str = "key",
) -> dict[str, object]:
    """One run: fresh bindings, W workers, the traffic, and what the store was asked."""
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("TRUNCATE affinity_bindings, affinity_binding_counts")
        await connection.execute(FILL[scope], pairs)
    finally:
        await connection.close()
    clock = VirtualClock()
    settings = AffinitySettings(janitor_interval_seconds=3600)
    pools, stores, shared, feeds = [], [], [], []
    for _ in range(workers):
        pool = await create_pool(url, min_size=2, max_size=10, statement_cache_size=100)
        store = CountingStore(pool)
        affinity = SharedAffinity(store, settings, Metrics(), clock=clock, sleep=clock.sleep)
        if mode == "notify":
            feed = BindingChanges(url, pool, affinity.changed)
            await feed.start()
            affinity.follow(feed)
            feeds.append(feed)
        await affinity.start()
        store.calls.clear()  # start-up probes are not requests' statements
        pools.append(pool)
        stores.append(store)
        shared.append(affinity)
    chooser = random.Random(17)
    phases = [chooser.uniform(0, PERIOD_SECONDS) for _ in range(pairs)]
    by_second: dict[int, list[int]] = {}
    for pair, phase in enumerate(phases):
        by_second.setdefault(int(phase), []).append(pair)
    requests = 0
    started = time.perf_counter()
    warm_up_seconds = int(warm_up * 60)
    try:
        for second in range(warm_up_seconds + int(minutes * 60)):
            if second == warm_up_seconds:
                await asyncio.sleep(0.2)  # renewals queued in the warm-up land in it
                for store in stores:
                    store.calls.clear()
                requests = 0
            clock.now = float(second)
            due = by_second.get(second % PERIOD_SECONDS, [])
            # One simulated second's requests, CONCURRENCY at a time (spread over a real second
            # they would rarely overlap more).
            for start in range(0, len(due), CONCURRENCY):
                await asyncio.gather(
                    *(
                        serve(chooser.choice(shared), *pair_of(scope, pair))
                        for pair in due[start : start + CONCURRENCY]
                    )
                )
            requests += len(due)
            await asyncio.sleep(0.001)  # let renewals and notifications run
        await asyncio.sleep(0.5)  # the renewal queues drain before counting
    finally:
        for affinity in shared:
            await affinity.stop()
        for feed in feeds:
            await feed.stop()
        for pool in pools:
            await pool.close()
    calls: Counter[str] = Counter()
    for store in stores:
        calls.update(store.calls)
    total = sum(calls.values())
    return {
        "mode": mode,
        "scope": scope,
        "pairs": pairs,
        "workers": workers,
        "simulated_minutes": minutes,
        "warm_up_minutes": warm_up,
        "requests": requests,
        "store_calls": dict(calls),
        "store_calls_per_request": round(total / requests, 5),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


async def run(
    pairs: int, workers: int, minutes: float, warm_up: float, scope: str
) -> list[dict[str, object]]:
    """Both modes on one throwaway server."""
    with tempfile.TemporaryDirectory(prefix="bench-store-statements-") as directory:
        server = EmbeddedPostgres(Path(directory) / "pgdata")
        server.start()
        try:
            pool = await create_pool(server.url, min_size=1, max_size=1, statement_cache_size=0)
            try:
                await apply_migrations(pool)
            finally:
                await pool.close()
            results = []
            for mode, count in (("notify", pairs), ("expire", max(1, pairs // 10))):
                result = await run_mode(
                    server.url,
                    mode,
                    pairs=count,
                    workers=workers,
                    minutes=minutes,
                    warm_up=warm_up,
                    scope=scope,
                )
                print(result, flush=True)
                results.append(result)
            return results
        finally:
            server.stop()


def main() -> None:
    """Parse flags, run both modes, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--warm-up", type=float, default=5)
    parser.add_argument("--scope", choices=("key", "conversation"), default="key")
    options = parser.parse_args()
    results = asyncio.run(
        run(options.pairs, options.workers, options.minutes, options.warm_up, options.scope)
    )
    for result in results:
        print(
            f"{result['mode']:>7}: {result['pairs']} pairs, {result['requests']} requests, "
            f"{result['store_calls_per_request']} store calls per request"
        )
    name = "store_statements" if options.scope == "key" else "store_statements_conversation"
    print(f"wrote {write_results(name, {'runs': results})}")


if __name__ == "__main__":
    main()
