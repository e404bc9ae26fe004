"""Added latency of one gateway worker: direct to a simulator vs through the gateway, side by side.

Run: `python -m bench.overhead [--rate 200] [--seconds 5] [--rounds 3]`.

One simulator process (zero latency, so the gateway's share is what is measured) and one gateway
worker process in front of it. An open-loop driver sends small non-streaming chat requests at a
fixed rate, alternating direct and gateway rounds so machine noise hits both alike. Latency is
measured from each request's scheduled send time (no coordinated omission). Prints a table and
writes `bench/results/overhead.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import summary, write_results
from bench.launcher import GatewayProcess, SimulatorProcess, free_port
from gateway.config_fleet import hash_key

KEY = "sk-bench-overhead"
MODEL = "bench-model"
BODY = json.dumps(
    {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
).encode()


async def fixed_rate(url: str, headers: dict[str, str], rate: float, seconds: float) -> list[float]:
    """Send requests at `rate` per second for `seconds`; return latencies in ms (NaN = failure)."""
    connector = aiohttp.TCPConnector(limit=0)
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(scheduled: float) -> None:
            try:
                async with session.post(url, data=BODY, headers=headers) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientError:
                ok = False
            latencies.append((time.monotonic() - scheduled) * 1000 if ok else float("nan"))

        start = time.monotonic() + 0.05
        tasks = []
        for index in range(int(rate * seconds)):
            scheduled = start + index / rate
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
    return latencies


async def measure(rate: float, seconds: float, rounds: int, work: Path) -> dict[str, Any]:
    """Start the simulator and the gateway, then alternate direct and gateway rounds."""
    instant = ["--base-ttft-ms", "0", "--per-token-ms", "0", "--tokens-per-second", "0"]
    simulator = SimulatorProcess("sim", instant, log=work / "simulator.log", core=1)
    async with simulator:
        simulator_url = simulator.url
        gateway_port = free_port()
        config = {
            "server": {"host": "127.0.0.1", "port": gateway_port, "workers": 1},
            "providers": [{"name": "sim", "url": simulator_url, "models": {MODEL: MODEL}}],
            "keys": [{"id": "bench", "key_sha256": hash_key(KEY)}],
        }
        gateway = GatewayProcess(config, work, port=gateway_port, core=0)
        gateway.start()
        try:
            await gateway.ready()
            samples = await alternate(simulator_url, gateway.url, rate, seconds, rounds)
        finally:
            gateway.stop()
    results = {name: summary(values) for name, values in samples.items()}
    results["added"] = {
        "median_ms": results["gateway"]["median_ms"] - results["direct"]["median_ms"],
        "p99_ms": results["gateway"]["p99_ms"] - results["direct"]["p99_ms"],
    }
    return results


async def alternate(
    simulator_url: str, gateway_url: str, rate: float, seconds: float, rounds: int
) -> dict[str, list[float]]:
    """Warm both targets, then `rounds` rounds of each in turn; their latencies."""
    targets = {
        "direct": (f"{simulator_url}/v1/chat/completions", {}),
        "gateway": (
            f"{gateway_url}/v1/chat/completions",
            {"Authorization": f"Bearer {KEY}"},
        ),
    }
    for url, headers in targets.values():  # warm connections and code paths
        await fixed_rate(url, headers | {"Content-Type": "application/json"}, rate, 1.0)
    samples: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(rounds):
        for name, (url, headers) in targets.items():
            samples[name] += await fixed_rate(
                url, headers | {"Content-Type": "application/json"}, rate, seconds
            )
    return samples


def main() -> int:
    """Run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per target")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = asyncio.run(measure(options.rate, options.seconds, options.rounds, Path(work)))
    rounds = f"{options.rounds} x {options.seconds:g} s"
    print(f"overhead at {options.rate:g} req/s, {rounds} per target")
    print(f"{'target':<10}{'requests':>10}{'failed':>8}{'median ms':>12}{'p99 ms':>10}")
    for name in ("direct", "gateway"):
        row = results[name]
        print(
            f"{name:<10}{row['requests']:>10}{row['failed']:>8}"
            f"{row['median_ms']:>12.2f}{row['p99_ms']:>10.2f}"
        )
    added = results["added"]
    print(f"{'added':<28}{added['median_ms']:>12.2f}{added['p99_ms']:>10.2f}")
    write_results(
        "overhead",
        {
            "rate": options.rate,
            "seconds_per_round": options.seconds,
            "rounds": options.rounds,
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
