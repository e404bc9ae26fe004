"""Agreement: do gateway processes started cold send each key to one node, even without the store?

Run: gateway bench agreement [--gateways 8] [--keys 1000] [--requests 3] [--concurrency 32]
                             [--nodes steady|instant|jittery] [--scenario NAME ...]

Three simulators (`--nodes`: a steady 100 ms to first token; instant answers; or 20-200 ms drawn
afresh for every request), `--gateways` single-worker `gateway serve`
processes started at once behind a real nginx, and `--keys` keys each sending `--requests`
requests as soon as nginx answers. Three scenarios, one after the other on one machine:
- store up: every gateway shares one Postgres (the product as designed);
- store down: Postgres stopped for the whole run (every gateway routes on its own);
- one partitioned: the first gateway's database URL points at a dead port while the others
  claim through Postgres; each key then sends one more request straight to that gateway, and we
  count how often it reaches the node the store bound the key to.
Reported: keys whose requests all reached one node, the affinity header counts, and for the
partition the share of the partitioned gateway's requests on the bound node. Writes
bench/results/agreement.json (steady nodes, every scenario) or agreement_<nodes>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from affinity_store.embedded import EmbeddedPostgres
from bench import launcher
from bench.harness import providers, write_results
from bench.launcher import wait_ready
from bench.nginx import NGINX, running_nginx
from gateway.config_fleet import hash_key

MODEL = "agreement-model"
NODES = ("node-a", "node-b", "node-c")
SCENARIOS = ("store up", "store down", "one partitioned")
# The nodes' timing: a steady 100 ms to first token like a real node, instant answers (the
# gateways' own samples are then only this host's scheduling noise), or a jittery 20-200 ms.
NODE_FLAGS = {
    "steady": ("--base-ttft-ms", "100", "--per-token-ms", "0", "--tokens-per-second", "0"),
    "instant": ("--base-ttft-ms", "0", "--per-token-ms", "0", "--tokens-per-second", "0"),
    "jittery": (
        "--base-ttft-ms",
        "20",
        "--ttft-jitter-ms",
        "180",
        "--per-token-ms",
        "0",
        "--tokens-per-second",
        "0",
    ),
}
DEAD_DATABASE = "postgresql://postgres:unused@127.0.0.1:9/none"


@asynccontextmanager
async def fleet(
    work: Path, options: argparse.Namespace, database_urls: list[str]
) -> AsyncIterator[tuple[str, list[str]]]:
    """Simulators, one gateway per database URL (started together) and nginx in front; yields
    nginx's URL and each gateway's own URL once nginx answers."""
    async with launcher.simulators(work, NODES, *NODE_FLAGS[options.nodes]) as simulators:
        nodes = {name: node.url for name, node in simulators.items()}
        configs: list[dict[str, Any]] = [
            {
                "providers": providers(nodes, MODEL),
                "keys": [
                    {"id": f"key-{key}", "key_sha256": hash_key(f"sk-agreement-{key}")}
                    for key in range(options.keys)
                ],
                "database": {"url": url},
            }
            for url in database_urls
        ]
        async with launcher.gateways(work, configs, ready_path=None) as gateways:
            ports = [gateway.port for gateway in gateways]
            with running_nginx(work / "nginx", ports, plain=True) as front:
                await wait_ready(front + "/healthz")  # the first gateway is up: go
                yield front, [gateway.url for gateway in gateways]


async def send(
    session: aiohttp.ClientSession, url: str, key: int
) -> tuple[int, str | None, str | None]:
    """One request for `key`: status, serving node, affinity header."""
    async with session.post(
        url + "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer sk-agreement-{key}"},
    ) as response:
        await response.read()
        return (
            response.status,
            response.headers.get("x-gateway-provider"),
            response.headers.get("x-gateway-affinity"),
        )


async def run_scenario(
    work: Path, scenario: str, options: argparse.Namespace, database: EmbeddedPostgres
) -> dict[str, Any]:
    """Start the fleet cold, send every key's requests in a shuffled burst, tally the nodes."""
    urls = [database.url] * options.gateways
    if scenario == "one partitioned":
        urls[0] = DEAD_DATABASE
    jobs = [key for key in range(options.keys) for _ in range(options.requests)]
    random.Random(1).shuffle(jobs)
    limit = asyncio.Semaphore(options.concurrency)
    nodes_per_key: dict[int, set[str]] = defaultdict(set)
    kinds: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    partitioned: dict[int, str | None] = {}
    async with (
        fleet(work, options, urls) as (front, gateways),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):

        async def one(url: str, key: int) -> tuple[int, str | None, str | None]:
            async with limit:
                return await send(session, url, key)

        healthy = gateways[1:] if scenario == "one partitioned" else [front]
        if scenario == "one partitioned":  # sent to them directly: each must be listening
            for url in healthy:
                await wait_ready(url + "/healthz")
        chooser = random.Random(2)
        outcomes = await asyncio.gather(*(one(chooser.choice(healthy), key) for key in jobs))
        for key, (status, node, kind) in zip(jobs, outcomes, strict=True):
            statuses[status] += 1
            kinds[kind or "?"] += 1
            if node is not None:
                nodes_per_key[key].add(node)
        if scenario == "one partitioned":
            await wait_ready(gateways[0] + "/healthz")
            answers = await asyncio.gather(*(one(gateways[0], key) for key in range(options.keys)))
            partitioned = {key: node for key, (_, node, _) in enumerate(answers)}
    result: dict[str, Any] = {
        "requests": len(jobs),
        "statuses": dict(statuses),
        "affinity": dict(kinds),
        "keys_on_one_node": sum(1 for names in nodes_per_key.values() if len(names) == 1),
        "keys": options.keys,
    }
    result["share_of_keys_on_one_node"] = round(result["keys_on_one_node"] / options.keys, 4)
    if scenario == "one partitioned":
        connection = await asyncpg.connect(database.url)
        try:
            rows = await connection.fetch("SELECT api_key_id, provider FROM affinity_bindings")
        finally:
            await connection.close()
        bound = {row["api_key_id"]: row["provider"] for row in rows}
        agreeing = sum(1 for key, node in partitioned.items() if bound.get(f"key-{key}") == node)
        result["partitioned_gateway_share_on_bound_node"] = round(agreeing / options.keys, 4)
    return result


async def run(options: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every scenario on a fresh Postgres database state, one after the other."""
    database = EmbeddedPostgres(work / "pgdata")
    results = {}
    for scenario in options.scenario or SCENARIOS:
        database.start()
        connection = await asyncpg.connect(database.url)
        try:  # the tables exist after the first scenario's gateways migrated them
            await connection.execute(
                "DROP TABLE IF EXISTS affinity_bindings, affinity_binding_counts, schema_migrations"
            )
        finally:
            await connection.close()
        if scenario == "store down":
            database.stop()
        directory = work / scenario.replace(" ", "-")
        directory.mkdir()
        results[scenario] = await run_scenario(directory, scenario, options, database)
        print(scenario, results[scenario], flush=True)
        if database.is_running():
            database.stop()
    return results


def main() -> int:
    """Run, print, write."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gateways", type=int, default=8)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--nodes", choices=sorted(NODE_FLAGS), default="steady")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS)
    options = parser.parse_args()
    if shutil.which(NGINX) is None:
        raise SystemExit(f"{NGINX} is needed (apt-get install nginx)")
    with tempfile.TemporaryDirectory(prefix="bench-agreement-") as work:
        results = asyncio.run(run(options, Path(work)))
    print(f"{options.gateways} gateways started cold behind nginx, {options.keys} keys")
    for scenario, row in results.items():
        extra = row.get("partitioned_gateway_share_on_bound_node")
        print(
            f"{scenario:<16} keys on one node {row['share_of_keys_on_one_node']:.2%}"
            + ("" if extra is None else f"; partitioned gateway on the bound node {extra:.2%}")
            + f"  {row['affinity']} {row['statuses']}"
        )
    name = "agreement"
    if options.nodes != "steady" or options.scenario:
        name = f"agreement_{options.nodes}_{options.gateways}"
    write_results(name, {"options": vars(options), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
