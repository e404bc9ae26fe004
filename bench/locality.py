"""Locality: how often a user's next turn lands on the node that holds its context.

Run: `python -m bench.locality [--keys 24] [--turns 10] [--workers 4]`; with `--engine vllm`,
on real vLLM nodes instead of simulators (`bench/locality_vllm.py`).

Three simulators with a real cost for uncached prompt tokens, `--workers` gateway processes
behind a real nginx (round robin across them, as a load balancer would), and `--keys` users each
holding a growing conversation (a long private system prompt, then turns). Three set-ups, side by
side in one run:
- shared: every gateway binds through one Postgres (the product);
- per-process: each gateway keeps bindings to itself (its own embedded Postgres);
- round robin: no stickiness at all.
Reported per set-up: the share of each key's requests on its most used node, the simulators'
prefix-cache hit rate (tokens), and request latency. Writes `bench/results/locality.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

from affinity_store.embedded import EmbeddedPostgres
from bench import launcher, locality_vllm
from bench.harness import providers, summary, write_results
from bench.nginx import NGINX, running_nginx
from gateway.config_fleet import hash_key

MODEL = "locality-model"
NODES = ("node-a", "node-b", "node-c")
# A cache miss costs 0.2 ms per prompt token on top of 20 ms, as prefill would.
# Each node's prefix cache holds about a third of the users' contexts: enough when every user
# sticks to one node, not when users wander over all three.
NODE_FLAGS = (
    "--base-ttft-ms", "20", "--per-token-ms", "0.2", "--tokens-per-second", "400",
    "--cache-tokens", "20000",
)  # fmt: skip
SETUPS = ("shared", "per-process", "round robin")


@asynccontextmanager
async def fleet(
    work: Path, setup: str, options: argparse.Namespace, database_url: str
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """Simulators, gateways and nginx for one set-up; yields nginx's URL and the node URLs."""
    async with launcher.simulators(work, NODES, *NODE_FLAGS) as simulators:
        nodes = {name: node.url for name, node in simulators.items()}
        config: dict[str, Any] = {
            "providers": providers(nodes, MODEL),
            "keys": [
                {"id": f"user-{index}", "key_sha256": hash_key(f"sk-locality-{index}")}
                for index in range(options.keys)
            ],
            "affinity": {"lookup_timeout_ms": options.lookup_timeout_ms},
            "models": [
                {"name": MODEL, "stickiness": "none" if setup == "round robin" else "shared"}
            ],
        }
        if setup == "shared":
            config["database"] = {"url": database_url}
        # per-process: each gateway in its own folder, so with its own embedded Postgres
        async with launcher.gateways(work, [config] * options.workers) as gateways:
            ports = [gateway.port for gateway in gateways]
            with running_nginx(work / "nginx", ports, plain=True) as front:
                await launcher.wait_ready(front + "/healthz")
                yield front, nodes


async def conversation(
    session: aiohttp.ClientSession, front: str, user: int, turns: int
) -> tuple[list[str], list[float], list[str]]:
    """One user's turns in order: the node that served each, its latency, its affinity."""
    system = f"You are the assistant of user {user}. " + " ".join(
        f"fact-{user}-{index}" for index in range(400)
    )
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    served, latencies, kinds = [], [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"question {turn} from user {user}"})
        started = time.perf_counter()
        async with session.post(
            front + "/v1/chat/completions",
            json={"model": MODEL, "messages": messages, "max_tokens": 8},
            headers={"Authorization": f"Bearer sk-locality-{user}"},
        ) as response:
            body = await response.json()
            latencies.append((time.perf_counter() - started) * 1000)
            served.append(response.headers.get("x-gateway-provider", "?"))
            kinds.append(response.headers.get("x-gateway-affinity", "?"))
        messages.append(body["choices"][0]["message"])
    return served, latencies, kinds


async def run_setup(
    work: Path, setup: str, options: argparse.Namespace, database_url: str
) -> dict[str, Any]:
    """One set-up: every user's conversation concurrently, then the nodes' cache counters."""
    async with (
        fleet(work, setup, options, database_url) as (front, nodes),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as session,
    ):
        outcomes = await asyncio.gather(
            *(conversation(session, front, user, options.turns) for user in range(options.keys))
        )
        hits = queries = 0
        for url in nodes.values():
            async with session.get(url + "/sim/stats") as response:
                stats = await response.json()
            hits += stats["prefix_cache_hits"]
            queries += stats["prefix_cache_queries"]
    shares = [Counter(served).most_common(1)[0][1] / len(served) for served, _, _ in outcomes]
    latencies = [value for _, values, _ in outcomes for value in values]
    return {
        "affinity": dict(Counter(kind for _, _, kinds in outcomes for kind in kinds)),
        "median_share_on_one_node": statistics.median(shares),
        "mean_share_on_one_node": round(statistics.fmean(shares), 3),
        "prefix_cache_hit_rate": round(hits / queries, 3) if queries else 0.0,
        **summary(latencies),
    }


async def run(options: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Every set-up, one after the other, on one machine."""
    database = EmbeddedPostgres(work / "shared-pgdata")
    database.start()
    try:
        results = {}
        for setup in SETUPS:
            directory = work / setup.replace(" ", "-")
            directory.mkdir()
            results[setup] = await run_setup(directory, setup, options, database.url)
        return results
    finally:
        database.stop()


def main() -> int:
    """Run, print, write."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keys", type=int, default=24)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument(
        "--lookup-timeout-ms",
        type=float,
        default=50,
        help="affinity.lookup_timeout_ms (on a saturated 2-core box 50 ms is often missed)",
    )
    parser.add_argument("--engine", choices=("simulator", "vllm"), default="simulator")
    locality_vllm.add_arguments(parser)
    options = parser.parse_args()
    if options.engine == "vllm":
        return locality_vllm.main(options)
    if shutil.which(NGINX) is None:
        raise SystemExit(f"{NGINX} is needed (apt-get install nginx)")
    with tempfile.TemporaryDirectory(prefix="bench-locality-") as work:
        results = asyncio.run(run(options, Path(work)))
    print(
        f"{options.keys} users x {options.turns} turns through nginx and {options.workers} gateways"
    )
    print(f"{'set-up':<14}{'on one node':>13}{'cache hits':>12}{'median ms':>11}{'p99 ms':>9}")
    for setup, row in results.items():
        print(
            f"{setup:<14}{row['mean_share_on_one_node']:>13.0%}{row['prefix_cache_hit_rate']:>12.0%}"
            f"{row['median_ms']:>11.1f}{row['p99_ms']:>9.1f}  {row['affinity']}"
        )
    write_results("locality", {"options": vars(options), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
