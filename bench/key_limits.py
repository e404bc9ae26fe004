"""Small key limits across 2 `gateway serve` x 2 workers on one Postgres, and the unit claim's cost.

Run: gateway bench key_limits [--rounds 5] [--gap 2] [--outage 12] [--claims 2000]
     [--gateway-source DIR]

Three scenarios through real processes (an embedded Postgres, a simulator node that holds each
request, aiohttp clients), each on a fresh cluster:

- burst: `max_concurrency: 2`; `--rounds` times, the key idle 3 s, then 12 requests at once on new
  connections to both replicas (the node holds each 3 s): requests admitted, node's peak in flight.
- sequential: `max_concurrency: 2`; 12 requests one at a time, `--gap` s apart, alternating
  replicas, on kept-alive connections and then on a new connection each: requests refused.
- outage: `max_concurrency: 4`, 8 clients (node holds each 0.4 s); Postgres stopped for
  `--outage` s (longer than a worker's 10 s registration), then 8 s more: the node's peak in
  flight before, during and after, and the answers by status.

Then the store call itself (`claim_unit` on the Postgres store, one statement under the key's
lock), `--claims` times: alone, and four workers at once on one key. `--gateway-source` runs
the gateway processes from another checkout (e.g. main, for the figures before this change).
Prints a table and writes bench/results/key_limits.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from affinity_store.embedded import EmbeddedPostgres
from affinity_store.migrate import apply_migrations
from affinity_store.postgres import create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from bench import launcher
from bench.harness import providers, write_results
from gateway.config_fleet import hash_key
from gateway.dispatch.key_shares import CONCURRENCY

MODEL = "limits-model"
KEY = "sk-limits-bench"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "limits"}], "max_tokens": 2}
IDLE_SECONDS = 3.0


class Cluster:
    """A node and two 2-worker gateways on one Postgres, for one scenario."""

    def __init__(self, node: str, gateways: list[str]) -> None:
        self.node = node
        self.gateways = gateways

    async def node_stats(self) -> dict[str, Any]:
        """The simulator's `/sim/stats`."""
        async with aiohttp.ClientSession() as session, session.get(self.node + "/sim/stats") as r:
            stats: dict[str, Any] = await r.json()
            return stats

    async def reset_node(self) -> None:
        """Zero the node's counters (its peak starts again from what is in flight)."""
        async with aiohttp.ClientSession() as session:
            await (await session.post(self.node + "/sim/reset")).read()


@asynccontextmanager
async def cluster(
    work: Path, database_url: str, limit: int, hold_ms: int, source: Path | None
) -> AsyncIterator[Cluster]:
    """Start the scenario's processes; stop them on exit."""
    scenario = work / f"{limit}-{hold_ms}"
    scenario.mkdir(exist_ok=True)
    flags = ("--base-ttft-ms", str(hold_ms))
    async with launcher.simulators(scenario, ["node"], *flags) as simulators:
        urls = {name: node.url for name, node in simulators.items()}
        config = {
            "providers": providers(urls, MODEL),
            "keys": [{"id": "limited", "key_sha256": hash_key(KEY), "max_concurrency": limit}],
            "database": {"url": database_url, "pool_min_size": 1, "pool_max_size": 4},
            "affinity": {"lookup_timeout_ms": 500, "claim_timeout_ms": 2000},
        }
        # The gateway imported from the checkout at `source` when given.
        environment = {"PYTHONPATH": str(source)} if source is not None else None
        async with launcher.gateways(
            scenario, [config] * 2, workers=2, environment=environment, ready_path="/readyz"
        ) as gateways:
            await _settle(database_url)
            yield Cluster(urls["node"], [gateway.url for gateway in gateways])


async def _settle(database_url: str) -> None:
    """Wait (bounded) until all four workers are registered and have claimed their shares."""
    connection = await asyncpg.connect(database_url)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            live = await connection.fetchval(
                "SELECT count(*) FROM gateway_workers WHERE expires_at > now()"
            )
            rows = await connection.fetchval(
                "SELECT count(*) FROM key_limit_shares JOIN gateway_workers USING (worker_id)"
                " WHERE gateway_workers.expires_at > now()"
            )
            if live == 4 and rows == 4:
                return
            await asyncio.sleep(0.1)
    finally:
        await connection.close()
    raise RuntimeError("the four workers did not settle within 60 s")


async def chat(session: aiohttp.ClientSession, gateway: str) -> int:
    """One chat request; its status (0 when the connection failed)."""
    try:
        async with session.post(
            gateway + "/v1/chat/completions",
            json=BODY,
            headers={"Authorization": f"Bearer {KEY}"},
        ) as response:
            await response.read()
            return response.status
    except aiohttp.ClientError:
        return 0


def fresh() -> aiohttp.ClientSession:
    """A session that opens a new connection per request."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def burst(work: Path, url: str, rounds: int, source: Path | None) -> dict[str, Any]:
    """12 at once after 3 s idle, `rounds` times."""
    admitted = []
    peaks = []
    async with cluster(work, url, 2, 3000, source) as nodes:
        for _ in range(rounds):
            await asyncio.sleep(IDLE_SECONDS)
            await nodes.reset_node()
            async with fresh() as session:
                statuses = await asyncio.gather(
                    *(chat(session, nodes.gateways[index % 2]) for index in range(12))
                )
            admitted.append(statuses.count(200))
            peaks.append((await nodes.node_stats())["peak_in_flight"])
    return {"limit": 2, "requests_per_round": 12, "admitted": admitted, "node_peak": peaks}


async def sequential(work: Path, url: str, gap: float, source: Path | None) -> dict[str, Any]:
    """12 one at a time on kept-alive connections, then 12 on new connections."""
    results: dict[str, Any] = {"limit": 2, "gap_seconds": gap}
    async with cluster(work, url, 2, 50, source) as nodes:
        for mode in ("kept_alive", "fresh"):
            connector = aiohttp.TCPConnector(force_close=mode == "fresh")
            statuses = []
            async with aiohttp.ClientSession(connector=connector) as session:
                for turn in range(12):
                    await asyncio.sleep(gap)
                    statuses.append(await chat(session, nodes.gateways[turn % 2]))
            results[mode] = {"requests": 12, "refused": 12 - statuses.count(200)}
    return results


async def outage(
    work: Path, server: EmbeddedPostgres, seconds: float, source: Path | None
) -> dict[str, Any]:
    """8 clients; the store down for `seconds`; the node's peak in flight per phase."""
    phases: dict[str, Counter[int]] = {name: Counter() for name in ("before", "during", "after")}
    peaks: dict[str, int] = {}
    phase = "before"
    stop = asyncio.Event()
    async with cluster(work, server.url, 4, 400, source) as nodes:

        async def client(index: int) -> None:
            async with fresh() as session:
                while not stop.is_set():
                    status = await chat(session, nodes.gateways[index % 2])
                    phases[phase][status] += 1
                    if status != 200:
                        await asyncio.sleep(0.05)

        clients = [asyncio.create_task(client(index)) for index in range(8)]
        await nodes.reset_node()
        await asyncio.sleep(3)
        peaks["before"] = (await nodes.node_stats())["peak_in_flight"]
        await nodes.reset_node()
        phase = "during"
        await asyncio.to_thread(server.stop, "fast")
        await asyncio.sleep(seconds)
        await asyncio.to_thread(server.start)
        peaks["during"] = (await nodes.node_stats())["peak_in_flight"]
        await nodes.reset_node()
        phase = "after"
        await asyncio.sleep(8)
        peaks["after"] = (await nodes.node_stats())["peak_in_flight"]
        stop.set()
        await asyncio.gather(*clients)
    return {
        "limit": 4,
        "outage_seconds": seconds,
        "node_peak": peaks,
        "statuses": {name: dict(sorted(counts.items())) for name, counts in phases.items()},
    }


async def claim_latency(url: str, claims: int) -> dict[str, Any]:
    """`claim_unit` + `release_units` on the Postgres store: alone, and four workers at once."""
    pool = await create_pool(url, min_size=4, max_size=8, statement_cache_size=100)
    store = PostgresAffinityStore(pool)
    workers = [f"bench-{index}" for index in range(4)]
    for worker in workers:
        await store.heartbeat(worker, ttl_seconds=600, timeout=5)

    async def one(worker: str, key: str) -> float:
        started = time.perf_counter()
        await store.claim_unit(key, CONCURRENCY, worker, limit=2, needed=1, timeout=1)
        elapsed = time.perf_counter() - started
        await store.release_units(key, CONCURRENCY, worker, keep=0, timeout=1)
        return elapsed * 1000

    try:
        alone = [await one(workers[0], "bench-alone") for _ in range(claims)]
        together: list[float] = []
        for _ in range(claims // 4):
            together.extend(await asyncio.gather(*(one(worker, "bench-4") for worker in workers)))
    finally:
        for worker in workers:
            await store.leave(worker, timeout=5)
        await pool.close()
    return {
        "claims": claims,
        "alone_ms": _percentiles(alone),
        "four_at_once_ms": _percentiles(together),
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 3),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 3),
    }


async def run(options: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every scenario against one embedded Postgres."""
    server = EmbeddedPostgres(work / "pgdata")
    server.start()
    try:
        connection = await asyncpg.connect(server.url)
        try:
            await apply_migrations(connection)
        finally:
            await connection.close()
        source = options.gateway_source
        results: dict[str, Any] = {
            "burst": await burst(work, server.url, options.rounds, source),
            "sequential": await sequential(work, server.url, options.gap, source),
            "outage": await outage(work, server, options.outage, source),
        }
        if source is None:
            results["claim_unit"] = await claim_latency(server.url, options.claims)
        return results
    finally:
        server.stop("fast")


def main() -> int:
    """Run the scenarios, print them, write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gap", type=float, default=2.0)
    parser.add_argument("--outage", type=float, default=12.0)
    parser.add_argument("--claims", type=int, default=2000)
    parser.add_argument("--gateway-source", type=Path, default=None)
    parser.add_argument("--name", default="key_limits", help="results file name")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as work:
        results = asyncio.run(run(options, Path(work)))
    for name, figures in results.items():
        print(f"{name}: {figures}")
    options_out = {**vars(options), "gateway_source": str(options.gateway_source or "")}
    write_results(options.name, {"options": options_out, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
