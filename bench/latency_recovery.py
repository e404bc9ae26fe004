"""Latency recovery: how soon does every gateway process band a slowed node, and forgive it?

Run: gateway bench latency_recovery [--gateways 4] [--slow-seconds 120] [--factor 3]

Three simulators (a steady 100 ms to first token), `--gateways` single-worker `gateway serve`
processes on one embedded Postgres, and a steady load of 60 keys at 12 requests in flight sent
to random gateways. After a calm minute, node-c is slowed `--factor` times for `--slow-seconds`,
then restored. Every gateway's `/metrics` is read twice a second. Reported per process: seconds
from the slowdown until node-c leaves band 0, and from the restore until it is back in band 0
(the default settings: polls every second, a 10 s node window). Writes
bench/results/latency_recovery.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from affinity_store.embedded import EmbeddedPostgres
from bench import launcher
from bench.harness import providers, write_results
from gateway.config_fleet import hash_key

MODEL = "recovery-model"
NODES = ("node-a", "node-b", "node-c")
SLOWED = "node-c"
KEYS = 60
IN_FLIGHT = 12
CALM_SECONDS = 60.0
NODE_FLAGS = ("--base-ttft-ms", "100", "--per-token-ms", "0", "--tokens-per-second", "0")
BAND = re.compile(
    r'^gateway_latency_band\{model="' + MODEL + r'",provider="' + SLOWED + r'"\} (\S+)$',
    re.MULTILINE,
)


async def band(session: aiohttp.ClientSession, url: str) -> int | None:
    """The slowed node's band on one gateway's metrics page."""
    async with session.get(url + "/metrics") as response:
        match = BAND.search(await response.text())
    return None if match is None else int(float(match.group(1)))


async def first_time(
    session: aiohttp.ClientSession, urls: list[str], wanted: Any, limit_seconds: float
) -> list[float | None]:
    """Seconds until each gateway's band first satisfies `wanted` (None: not within the limit)."""
    began = time.monotonic()
    found: list[float | None] = [None] * len(urls)
    while time.monotonic() - began < limit_seconds and None in found:
        for index, url in enumerate(urls):
            if found[index] is None and wanted(await band(session, url)):
                found[index] = round(time.monotonic() - began, 1)
        await asyncio.sleep(0.5)
    return found


async def run(options: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Start everything, load it, slow node-c, restore it, and time what the gateways see."""
    database = EmbeddedPostgres(work / "pgdata")
    database.start()
    try:
        async with launcher.simulators(work, NODES, *NODE_FLAGS) as simulators:
            nodes = {name: node.url for name, node in simulators.items()}
            config = {
                "providers": providers(nodes, MODEL),
                "keys": [
                    {"id": f"key-{key}", "key_sha256": hash_key(f"sk-recovery-{key}")}
                    for key in range(KEYS)
                ],
                "database": {"url": database.url},
            }
            async with launcher.gateways(work, [config] * options.gateways) as gateways:
                urls = [gateway.url for gateway in gateways]
                return await measure(options, urls, nodes[SLOWED])
    finally:
        database.stop()


async def measure(options: argparse.Namespace, urls: list[str], slowed: str) -> dict[str, Any]:
    """The timed part, with the load running."""
    stop = asyncio.Event()
    chooser = random.Random(1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def load() -> None:
            while not stop.is_set():
                key = chooser.randrange(KEYS)
                async with session.post(
                    chooser.choice(urls) + "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": f"k{key}"}]},
                    headers={"Authorization": f"Bearer sk-recovery-{key}"},
                ) as response:
                    await response.read()

        async def faults(slow: float) -> None:
            async with session.post(slowed + "/sim/faults", json={"slow": slow}) as response:
                response.raise_for_status()

        loops = [asyncio.create_task(load()) for _ in range(IN_FLIGHT)]
        try:
            await asyncio.sleep(CALM_SECONDS)
            calm = [await band(session, url) for url in urls]
            await faults(options.factor)
            left = await first_time(
                session, urls, lambda value: value is not None and value > 0, options.slow_seconds
            )
            # The rest of the slow period, then the restore.
            await asyncio.sleep(max(0.0, options.slow_seconds - max(x or 0 for x in left)))
            await faults(1.0)
            back = await first_time(session, urls, lambda value: value == 0, 120.0)
        finally:
            stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
    return {
        "bands_before_slowdown": calm,
        "seconds_to_leave_band_0": left,
        "seconds_to_return_to_band_0": back,
        "median_seconds_to_leave": statistics.median(x for x in left if x is not None)
        if any(x is not None for x in left)
        else None,
        "median_seconds_to_return": statistics.median(x for x in back if x is not None)
        if any(x is not None for x in back)
        else None,
    }


def main() -> int:
    """Run, print, write."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--slow-seconds", type=float, default=120.0)
    parser.add_argument("--factor", type=float, default=3.0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as work:
        results = asyncio.run(run(options, Path(work)))
    print(results)
    write_results("latency_recovery", {"options": vars(options), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
