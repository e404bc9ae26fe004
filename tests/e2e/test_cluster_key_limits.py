"""A key's limits hold across every worker of every replica: 2 `gateway serve` x 2 workers."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from bench import launcher
from bench.launcher import GatewayProcess
from gateway.dispatch.key_shares import BURST_SECONDS
from tests.support.gateway import TEST_KEY, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPLICAS = 2
WORKERS = 2
CLIENTS = 10


@asynccontextmanager
async def cluster(
    database_url: str, tmp_path: Path, key_limits: dict[str, Any], simulator: list[str]
) -> AsyncIterator[tuple[SimulatorProcess, list[GatewayProcess], asyncpg.Connection]]:
    """A slow simulator and two 2-worker gateways on one Postgres, with all 4 workers live."""
    async with AsyncExitStack() as stack:
        node = await stack.enter_async_context(SimulatorProcess("slow", simulator))
        config = settings_dict({"slow": node.url})
        config["database"] = {"url": database_url, "pool_min_size": 1, "pool_max_size": 4}
        config["affinity"] = {"lookup_timeout_ms": 500, "claim_timeout_ms": 2000}
        config["keys"][0].update(key_limits)
        gateways = await stack.enter_async_context(
            launcher.gateways(tmp_path, [config] * REPLICAS, workers=WORKERS)
        )
        connection = await asyncpg.connect(database_url)
        stack.push_async_callback(connection.close)

        async def every_worker_holds_its_shares() -> bool:
            """All workers live, and each has claimed a share row for every limit of the key."""
            live = await connection.fetchval(
                "SELECT count(*) FROM gateway_workers WHERE expires_at > now()"
            )
            shares = await connection.fetchval(
                "SELECT count(*) FROM key_limit_shares JOIN gateway_workers USING (worker_id)"
                " WHERE gateway_workers.expires_at > now()"
            )
            return bool(live == REPLICAS * WORKERS and shares == live * len(key_limits))

        await wait_until(every_worker_holds_its_shares, timeout=60, message="shares settled")
        await node.reset()
        yield node, gateways, connection


async def hammer(
    gateways: list[GatewayProcess], seconds: float, *, pause: float
) -> tuple[Counter[int], list[dict[str, Any]], list[str]]:
    """`CLIENTS` clients send one request at a time for `seconds`, each on a new connection to
    a random gateway; a refused one waits `pause` and tries again."""
    statuses: Counter[int] = Counter()
    refusals: list[dict[str, Any]] = []
    retry_afters: list[str] = []
    chooser = random.Random(5)
    deadline = time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < deadline:
            gateway = chooser.choice(gateways)
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
                session.post(
                    gateway.url + "/v1/chat/completions",
                    data=orjson.dumps(chat_body("cluster limits", max_tokens=2)),
                    headers={"Authorization": f"Bearer {TEST_KEY}"},
                ) as response,
            ):
                body = await response.read()
                statuses[response.status] += 1
                if response.status == 429:
                    refusals.append(orjson.loads(body)["error"])
                    retry_afters.append(response.headers.get("Retry-After", ""))
                    await asyncio.sleep(pause)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return statuses, refusals, retry_afters


async def test_max_concurrency_two_holds_across_two_replicas_of_two_workers(
    database_url: str, tmp_path: Path
) -> None:
    """`max_concurrency: 2`, 10 clients hammering 4 workers: the upstream never sees more than 2
    of the key's requests at once (the documented tolerance is 0 while the store answers), and
    it does see 2: the shares follow the demand instead of leaving the limit unusable."""
    async with cluster(
        database_url, tmp_path, {"max_concurrency": 2}, ["--base-ttft-ms", "400"]
    ) as (node, gateways, _):
        statuses, refusals, retry_afters = await hammer(gateways, 12, pause=0.05)
        stats = await node.stats()
    assert set(statuses) <= {200, 429}, statuses
    assert stats.peak_in_flight == 2, (stats.peak_in_flight, statuses)
    assert statuses[200] == stats.completed
    assert statuses[200] >= 10, statuses  # ~12 s / 0.4 s x 2 slots at best; shares move
    assert {refusal["code"] for refusal in refusals} == {"key_concurrency_limit"}
    assert {refusal["type"] for refusal in refusals} == {"rate_limit_error"}
    assert set(retry_afters) == {"1"}


async def test_requests_per_minute_holds_across_two_replicas_of_two_workers(
    database_url: str, tmp_path: Path
) -> None:
    """`requests_per_minute: 60`, 10 clients hammering 4 workers for 20 s: the cluster admits at
    most the documented bound (60 x 20/60 + 60 x BURST_SECONDS/60 + one per worker = 34),
    where four workers each applying the whole limit would admit about 4 x 30 = 120."""
    rpm, seconds = 60, 20.0
    async with cluster(
        database_url, tmp_path, {"requests_per_minute": rpm}, ["--base-ttft-ms", "5"]
    ) as (node, gateways, _):
        statuses, refusals, retry_afters = await hammer(gateways, seconds, pause=0.05)
        stats = await node.stats()
    bound = rpm * seconds / 60 + rpm * BURST_SECONDS / 60 + REPLICAS * WORKERS
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] == stats.completed
    assert statuses[200] <= bound, statuses
    assert statuses[200] >= rpm * seconds / 60 / 2, statuses  # the shares follow the demand
    assert {refusal["code"] for refusal in refusals} == {"key_rate_limit"}
    assert all(int(value) >= 1 for value in retry_afters)


async def test_a_killed_replica_drops_out_and_the_workers_left_share_its_part(
    database_url: str, tmp_path: Path
) -> None:
    """`max_concurrency: 4` over 2 x 2 workers; one replica is killed (no clean leave): once its
    heartbeats are 10 s old its workers drop out, and the two workers left run all 4 at once."""
    async with cluster(
        database_url, tmp_path, {"max_concurrency": 4}, ["--base-ttft-ms", "400"]
    ) as (node, gateways, connection):
        killed = gateways[1].process
        assert killed is not None
        killed.kill()
        killed.wait(timeout=10)

        async def two_workers_live() -> bool:
            """Only the surviving replica's workers are still registered."""
            live = await connection.fetchval(
                "SELECT count(*) FROM gateway_workers WHERE expires_at > now()"
            )
            return bool(live == WORKERS)

        await wait_until(two_workers_live, timeout=30, message="killed workers expired")
        await node.reset()
        statuses, _, _ = await hammer(gateways[:1], 8, pause=0.05)
        stats = await node.stats()
    assert stats.peak_in_flight == 4, (stats.peak_in_flight, statuses)
    assert statuses[200] == stats.completed
