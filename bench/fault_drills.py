"""Fault drills: what clients see when one of three nodes dies, rate limits, or slows down 10x.

Run: `python -m bench.fault_drills [--clients 50] [--seconds 15] [--fault-at 3]`.

Each drill starts three simulator processes and one gateway process (embedded Postgres), runs
`--clients` closed-loop clients (one key each, small non-streaming chats) for `--seconds`, and
injects the fault into one node after `--fault-at` seconds. A baseline runs with no fault.
Prints requests sent, failed and latency percentiles per drill and writes
`bench/results/fault_drills.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench import launcher
from bench.harness import providers, summary, write_results
from gateway.config_fleet import hash_key

MODEL = "drill-model"
NODES = ("node-a", "node-b", "node-c")
NODE_FLAGS = ("--base-ttft-ms", "20", "--tokens-per-second", "200")

Fault = Callable[[str, Any], Awaitable[None]]


async def set_faults(url: str, **faults: Any) -> None:
    """`POST /sim/faults` on one node."""
    async with aiohttp.ClientSession() as session, session.post(url + "/sim/faults", json=faults):
        pass


async def no_fault(url: str, process: Any) -> None:
    """The baseline."""


async def kill(url: str, process: Any) -> None:
    """The node dies at once."""
    await process.kill()


async def rate_limit(url: str, process: Any) -> None:
    """The node answers 429 with Retry-After: 5 from now on."""
    await set_faults(url, rate_limit_retry_after=5)


async def slow_down(url: str, process: Any) -> None:
    """The node gets ten times slower."""
    await set_faults(url, slow=10)


DRILLS: dict[str, Fault] = {
    "baseline": no_fault,
    "one node killed": kill,
    "one node answering 429": rate_limit,
    "one node slowed 10x": slow_down,
}


async def drill(fault: Fault, clients: int, seconds: float, fault_at: float, work: Path) -> Any:
    """Run one drill; the latency of every request, NaN for failures."""
    async with launcher.simulators(work, NODES, *NODE_FLAGS) as nodes:
        urls = {name: node.url for name, node in nodes.items()}
        config = {
            "providers": providers(urls, MODEL),
            "keys": [
                {"id": f"client-{index}", "key_sha256": hash_key(f"sk-drill-{index}")}
                for index in range(clients)
            ],
            "routing": {"connect_timeout_seconds": 1},
        }
        async with launcher.gateways(work, [config]) as (process,):
            return await load(
                fault, process.url, nodes, clients=clients, seconds=seconds, fault_at=fault_at
            )


async def load(
    fault: Fault,
    gateway: str,
    nodes: dict[str, launcher.SimulatorProcess],
    *,
    clients: int,
    seconds: float,
    fault_at: float,
) -> list[float]:
    """`clients` closed-loop clients for `seconds`, the fault injected into the first node after
    `fault_at` seconds; the latency of every request, NaN for failures."""
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    body = {"model": MODEL, "messages": [{"role": "user", "content": "drill"}], "max_tokens": 8}

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        headers = {"Authorization": f"Bearer sk-drill-{index}"}
        while time.monotonic() < deadline:
            started_at = time.perf_counter()
            try:
                async with session.post(
                    gateway + "/v1/chat/completions", json=body, headers=headers
                ) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            latencies.append((time.perf_counter() - started_at) * 1000 if ok else float("nan"))

    async def inject() -> None:
        await asyncio.sleep(fault_at)
        victim = next(iter(nodes.values()))
        await fault(victim.url, victim)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(inject(), *(client(session, index) for index in range(clients)))
    return latencies


def main() -> int:
    """Run every drill, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--fault-at", type=float, default=3.0)
    options = parser.parse_args()
    results = {}
    for name, fault in DRILLS.items():
        with tempfile.TemporaryDirectory(prefix="bench-drill-") as work:
            latencies = asyncio.run(
                drill(fault, options.clients, options.seconds, options.fault_at, Path(work))
            )
        results[name] = summary(latencies)
    print(f"{'drill':<26}{'sent':>8}{'failed':>8}{'median ms':>12}{'p99 ms':>10}")
    for name, row in results.items():
        print(
            f"{name:<26}{row['requests']:>8}{row['failed']:>8}"
            f"{row['median_ms']:>12.1f}{row['p99_ms']:>10.1f}"
        )
    write_results("fault_drills", {"options": vars(options), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
