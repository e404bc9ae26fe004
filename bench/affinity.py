"""Shared affinity's costs: the hit path, a claim storm across workers, statements per request.

Run: `python -m bench.affinity [--lookups 3000] [--storm 200] [--steady 2000]`.

One embedded Postgres (durable defaults, pg_stat_statements loaded) serves three parts:
- hit path: `SharedAffinity.lookup` for a bound key, local cache on (5 s) and off, in-process;
- storm: 200 concurrent first requests for one (key, model) spread over 4 gateway processes in
  front of 3 simulators — bindings created, nodes used, request and claim latency;
- steady state: database statements per request over many bound keys, local cache on and off.
Prints a table and writes `bench/results/affinity.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from affinity_store.embedded import EmbeddedPostgres
from affinity_store.migrate import apply_migrations
from affinity_store.postgres import create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import Candidate
from bench import launcher
from bench.harness import providers, summary, write_results
from gateway.config_fleet import hash_key
from gateway.config_service import AffinitySettings
from gateway.selection.affinity import SharedAffinity
from gateway.shared.metrics import Metrics

MODEL = "bench-model"
NODES = ("node-a", "node-b", "node-c")
WORKERS = 4
STATS_QUERY = "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query !~* 'pg_stat'"


async def hit_path(url: str, lookups: int) -> dict[str, Any]:
    """Lookup latency for one bound key, with the local cache on and off."""
    pool = await create_pool(url, min_size=1, max_size=2, statement_cache_size=100)
    store = PostgresAffinityStore(pool)
    candidate = Candidate("node-a", "node-a")
    results: dict[str, Any] = {}
    try:
        for label, cache_seconds in (("local_cache_on", 5.0), ("local_cache_off", 0.0)):
            affinity = SharedAffinity(
                store, AffinitySettings(local_cache_seconds=cache_seconds), Metrics()
            )
            await affinity.claim("hit-key", MODEL, preferred=[candidate], acceptable=["node-a"])
            samples = []
            for _ in range(lookups):
                started = time.perf_counter()
                lookup = await affinity.lookup("hit-key", MODEL)
                samples.append((time.perf_counter() - started) * 1000)
                assert lookup.binding is not None
                assert not lookup.degraded
            results[label] = {
                **summary(samples),
                "median_us": statistics.median(samples) * 1000,
            }
    finally:
        await pool.close()
    return results


def gateway_config(database_url: str, node_urls: dict[str, str], keys: int) -> dict[str, Any]:
    """A gateway config: the simulators, `keys` keys, the shared database."""
    return {
        "database": {"url": database_url, "pool_min_size": 2, "pool_max_size": 8},
        "providers": providers(node_urls, MODEL),
        "keys": [
            {"id": f"key-{index}", "key_sha256": hash_key(f"sk-bench-{index}")}
            for index in range(keys)
        ],
    }


async def post(session: aiohttp.ClientSession, url: str, key: int) -> float:
    """One small chat completion; latency in ms, NaN on failure."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    started = time.perf_counter()
    try:
        async with session.post(
            url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer sk-bench-{key}"},
        ) as response:
            await response.read()
            ok = response.status == 200
    except aiohttp.ClientError:
        ok = False
    return (time.perf_counter() - started) * 1000 if ok else float("nan")


async def claim_stats(session: aiohttp.ClientSession, gateways: list[str]) -> dict[str, float]:
    """Claims made and their mean duration, summed over the gateways' metrics."""
    count = total = 0.0
    for url in gateways:
        async with session.get(url + "/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            if family.name != "gateway_store_call_duration_seconds":
                continue
            for sample in family.samples:
                if sample.labels.get("operation") != "claim":
                    continue
                if sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
    return {"claims": count, "mean_claim_ms": total / count * 1000 if count else float("nan")}


@asynccontextmanager
async def gateways(
    work: Path, database_url: str, node_urls: dict[str, str], keys: int, cache_seconds: float
) -> AsyncIterator[list[str]]:
    """WORKERS gateway processes on one database; their URLs while they run."""
    config = gateway_config(database_url, node_urls, keys)
    config["affinity"] = {"local_cache_seconds": cache_seconds}
    directory = Path(tempfile.mkdtemp(prefix="gateways-", dir=work))
    async with launcher.gateways(directory, [config] * WORKERS) as started:
        yield [gateway.url for gateway in started]


async def storm(
    work: Path, database_url: str, node_urls: dict[str, str], requests: int
) -> dict[str, Any]:
    """`requests` concurrent first requests for one key over the gateways."""
    async with (
        gateways(work, database_url, node_urls, 1, 5.0) as urls,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        latencies = await asyncio.gather(
            *(post(session, urls[index % len(urls)], 0) for index in range(requests))
        )
        claims = await claim_stats(session, urls)
        used = []
        for name, url in node_urls.items():
            async with session.get(url + "/sim/stats") as response:
                if (await response.json())["completed"]:
                    used.append(name)
    connection = await asyncpg.connect(database_url)
    try:
        bindings = await connection.fetchval(
            "SELECT count(*) FROM affinity_bindings WHERE api_key_id = 'key-0'"
        )
    finally:
        await connection.close()
    return {**summary(list(latencies)), **claims, "bindings": bindings, "nodes_used": used}


async def steady_state(
    work: Path,
    database_url: str,
    node_urls: dict[str, str],
    requests: int,
    cache_seconds: float,
) -> dict[str, Any]:
    """Statements per request once every key is bound, over random keys and gateways."""
    keys = 50
    chooser = random.Random(3)
    connection = await asyncpg.connect(database_url)
    try:
        async with (
            gateways(work, database_url, node_urls, keys, cache_seconds) as urls,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        ):
            for key in range(keys):  # bind every key first
                await post(session, urls[key % len(urls)], key)
            await connection.execute("SELECT pg_stat_statements_reset()")
            limit = asyncio.Semaphore(16)

            async def one() -> float:
                async with limit:
                    return await post(session, chooser.choice(urls), chooser.randrange(keys))

            started = time.perf_counter()
            latencies = await asyncio.gather(*(one() for _ in range(requests)))
            seconds = time.perf_counter() - started
            statements = await connection.fetchval(STATS_QUERY)
    finally:
        await connection.close()
    return {
        **summary(list(latencies)),
        "seconds": round(seconds, 2),
        "statements": int(statements),
        "statements_per_request": round(int(statements) / requests, 3),
    }


async def run(options: argparse.Namespace, work: Path) -> dict[str, Any]:
    """All three parts against one embedded Postgres."""
    server = EmbeddedPostgres(
        work / "pgdata", settings={"shared_preload_libraries": "pg_stat_statements"}
    )
    server.start()
    try:
        connection = await asyncpg.connect(server.url)
        try:
            await apply_migrations(connection)
            await connection.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        finally:
            await connection.close()
        results: dict[str, Any] = {"hit_path": await hit_path(server.url, options.lookups)}
        async with launcher.simulators(work, NODES, "--base-ttft-ms", "1") as nodes:
            node_urls = {name: node.url for name, node in nodes.items()}
            results["storm"] = await storm(work, server.url, node_urls, options.storm)
            results["steady_state"] = {
                "local_cache_on": await steady_state(
                    work, server.url, node_urls, options.steady, 5
                ),
                "local_cache_off": await steady_state(
                    work, server.url, node_urls, options.steady, 0
                ),
            }
        return results
    finally:
        server.stop()


def main() -> int:
    """Run, print, write."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--lookups", type=int, default=3000)
    parser.add_argument("--storm", type=int, default=200)
    parser.add_argument("--steady", type=int, default=2000)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-affinity-") as work:
        results = asyncio.run(run(options, Path(work)))
    hit = results["hit_path"]
    print("hit path (SharedAffinity.lookup, one bound key)")
    for label in ("local_cache_on", "local_cache_off"):
        row = hit[label]
        print(f"  {label:<16} median {row['median_ms']:.3f} ms  p99 {row['p99_ms']:.3f} ms")
    storm_result = results["storm"]
    print(
        f"storm: {storm_result['requests']} first requests over {WORKERS} gateways -> "
        f"{storm_result['bindings']} binding(s), nodes used {storm_result['nodes_used']}, "
        f"{storm_result['failed']} failed, median {storm_result['median_ms']:.1f} ms, "
        f"p99 {storm_result['p99_ms']:.1f} ms, {storm_result['claims']:.0f} claims "
        f"(mean {storm_result['mean_claim_ms']:.2f} ms)"
    )
    for label, row in results["steady_state"].items():
        print(
            f"steady state {label}: {row['statements_per_request']} statements/request "
            f"({row['statements']} over {row['requests']} requests, {row['failed']} failed)"
        )
    write_results("affinity", {"options": vars(options), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
