"""Latency every gateway process agrees on: the nodes' own TTFT figures, read by every process."""

from __future__ import annotations

import asyncio
import random
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench import launcher
from bench.launcher import GatewayProcess
from gateway.config_fleet import hash_key
from tests.support.gateway import TEST_MODEL, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

NODES = ("node-a", "node-b", "node-c")
DEAD_DATABASE = "postgresql://postgres:unused@127.0.0.1:9/none"
# Quick polls and a short window, so a test sees the fleet view change within seconds.
ROUTING = {"load_poll_interval_seconds": 0.25, "node_latency_window_seconds": 3}


@asynccontextmanager
async def fleet(
    tmp_path: Path, node_flags: Sequence[str], database_url: str, gateways: int, keys: int
) -> AsyncIterator[tuple[list[SimulatorProcess], list[GatewayProcess]]]:
    """Three simulators and `gateways` single-worker gateway processes, all answering."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(SimulatorProcess(name, node_flags)) for name in NODES
        ]
        config = settings_dict({node.name: node.url for node in nodes})
        config["routing"] = {**config["routing"], **ROUTING}
        config["database"] = {"url": database_url, "pool_min_size": 1, "pool_max_size": 4}
        config["affinity"] = {"lookup_timeout_ms": 500, "claim_timeout_ms": 2000}
        config["keys"] = [
            {"id": f"key-{index}", "key_sha256": hash_key(f"sk-latency-{index}")}
            for index in range(keys)
        ]
        processes = await stack.enter_async_context(
            launcher.gateways(tmp_path, [config] * gateways, workers=1)
        )
        yield nodes, processes


async def send(
    session: aiohttp.ClientSession, gateway: GatewayProcess, key: int
) -> tuple[int, str | None, str | None]:
    """One chat request of `key`: status, serving node, affinity header."""
    async with session.post(
        gateway.url + "/v1/chat/completions",
        data=orjson.dumps(chat_body(f"key {key}: hello", max_tokens=2)),
        headers={"Authorization": f"Bearer sk-latency-{key}"},
    ) as response:
        await response.read()
        return (
            response.status,
            response.headers.get("x-gateway-provider"),
            response.headers.get("x-gateway-affinity"),
        )


def band_of(metrics_page: str, provider: str) -> int | None:
    """The provider's `gateway_latency_band` for the test model on one metrics page."""
    pattern = re.compile(
        r'^gateway_latency_band\{(?=[^}]*model="' + re.escape(TEST_MODEL) + r'")'
        r'(?=[^}]*provider="' + re.escape(provider) + r'")[^}]*\} (\S+)$',
        re.MULTILINE,
    )
    match = pattern.search(metrics_page)
    return None if match is None else int(float(match.group(1)))


def source_of(metrics_page: str, provider: str) -> str | None:
    """Which source the provider's band comes from, per `gateway_latency_source`."""
    for source in ("node", "own", "none"):
        line = f'gateway_latency_source{{provider="{provider}",source="{source}"}} 1.0'
        if line in metrics_page:
            return source
    return None


async def bands(
    session: aiohttp.ClientSession, gateways: Sequence[GatewayProcess], provider: str
) -> list[tuple[int | None, str | None]]:
    """Each gateway process's band and latency source for the provider."""
    seen = []
    for gateway in gateways:
        async with session.get(gateway.url + "/metrics") as response:
            page = await response.text()
        seen.append((band_of(page, provider), source_of(page, provider)))
    return seen


@pytest.mark.parametrize(
    "node_flags",
    [
        pytest.param(("--base-ttft-ms", "0", "--per-token-ms", "0"), id="instant"),
        pytest.param(
            ("--base-ttft-ms", "5", "--per-token-ms", "0", "--ttft-jitter-ms", "45"), id="jittery"
        ),
    ],
)
async def test_a_store_down_fleet_keeps_every_key_on_one_node(
    tmp_path: Path, node_flags: Sequence[str]
) -> None:
    """Postgres unreachable from the start, 4 gateways, 40 keys x 8 requests from random
    gateways: every key's requests reach one node, instant or jittery."""
    keys, requests_per_key = 40, 8
    flags = (*node_flags, "--tokens-per-second", "0")
    async with (
        fleet(tmp_path, flags, DEAD_DATABASE, gateways=4, keys=keys) as (_, gateways),
        aiohttp.ClientSession() as session,
    ):
        jobs = [key for key in range(keys) for _ in range(requests_per_key)]
        random.Random(3).shuffle(jobs)
        chooser = random.Random(5)
        limit = asyncio.Semaphore(16)

        async def one(key: int) -> tuple[int, str | None, str | None]:
            async with limit:
                return await send(session, chooser.choice(gateways), key)

        outcomes = await asyncio.gather(*(one(key) for key in jobs))
    nodes_per_key: dict[int, set[str]] = defaultdict(set)
    for key, (status, node, affinity) in zip(jobs, outcomes, strict=True):
        assert (status, affinity) == (200, "degraded")
        assert node is not None
        nodes_per_key[key].add(node)
    split = {key: sorted(nodes) for key, nodes in nodes_per_key.items() if len(nodes) > 1}
    assert split == {}
    assert len({next(iter(nodes)) for nodes in nodes_per_key.values()}) == 3


async def test_a_slowed_node_leaves_band_zero_and_returns_in_every_process(
    database_url: str, tmp_path: Path
) -> None:
    """A node slowed three times over is banded slow by every gateway process, from its own
    metrics, and back in band 0 in every process once it recovers."""
    keys = 30
    flags = ("--base-ttft-ms", "20", "--per-token-ms", "0", "--tokens-per-second", "0")
    async with (
        fleet(tmp_path, flags, database_url, gateways=3, keys=keys) as (nodes, gateways),
        aiohttp.ClientSession() as session,
    ):
        stop = asyncio.Event()
        chooser = random.Random(9)

        async def traffic() -> None:
            while not stop.is_set():
                await send(session, chooser.choice(gateways), chooser.randrange(keys))

        loops = [asyncio.create_task(traffic()) for _ in range(6)]
        try:

            async def every_process(predicate: Any) -> bool:
                return all(
                    predicate(band, source)
                    for band, source in await bands(session, gateways, "node-c")
                )

            await wait_until(
                lambda: every_process(lambda band, source: band == 0 and source == "node"),
                timeout=30,
                interval=0.2,
                message="node-c in band 0 from node metrics in every process",
            )
            await nodes[2].set_faults(slow=3.0)
            await wait_until(
                lambda: every_process(lambda band, source: band is not None and band > 0),
                timeout=30,
                interval=0.2,
                message="node-c banded slow in every process",
            )
            await nodes[2].set_faults(slow=1.0)
            await wait_until(
                lambda: every_process(lambda band, source: band == 0),
                timeout=30,
                interval=0.2,
                message="node-c back in band 0 in every process",
            )
        finally:
            stop.set()
            await asyncio.gather(*loops, return_exceptions=True)
