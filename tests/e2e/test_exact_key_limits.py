"""Small key limits are exact across processes: 2 `gateway serve` x 2 workers on one Postgres,
a simulator that holds each request (it counts what is in flight), real HTTP clients."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest

from affinity_store.embedded import EmbeddedPostgres
from bench.launcher import GatewayProcess
from gateway.dispatch.cluster_shares import WORKER_TTL_SECONDS
from tests.e2e.test_cluster_key_limits import cluster
from tests.support.gateway import TEST_KEY, chat_body
from tests.support.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

IDLE_SECONDS = 3.0  # the scenario's quiet spell before the burst
OUTAGE_SECONDS = WORKER_TTL_SECONDS + 2  # longer than a worker's registration lives


async def chat(
    session: aiohttp.ClientSession, gateway: GatewayProcess
) -> tuple[int, dict[str, Any] | None]:
    """One chat request; its status, and its error when refused."""
    async with session.post(
        gateway.url + "/v1/chat/completions",
        data=orjson.dumps(chat_body("exact limits", max_tokens=2)),
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    ) as response:
        body = await response.read()
        error = orjson.loads(body)["error"] if response.status >= 400 else None
        return response.status, error


def fresh_session() -> aiohttp.ClientSession:
    """A client session that opens a new connection for every request."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def test_twelve_at_once_after_an_idle_spell_admit_exactly_the_limit(
    database_url: str, tmp_path: Any
) -> None:
    """`max_concurrency: 2` over 2 x 2 workers, idle for 3 s, then 12 requests at once (fresh
    connections to both replicas): exactly 2 are admitted, and the node sees exactly 2; the
    other 10 are 429 saying the limit is in use across the workers."""
    async with cluster(
        database_url, tmp_path, {"max_concurrency": 2}, ["--base-ttft-ms", "3000"]
    ) as (node, gateways, _):
        await asyncio.sleep(IDLE_SECONDS)
        async with fresh_session() as session:
            outcomes = await asyncio.gather(
                *(chat(session, gateways[index % 2]) for index in range(12))
            )
        stats = await node.stats()
    statuses = Counter(status for status, _ in outcomes)
    assert statuses == {200: 2, 429: 10}, outcomes
    assert stats.peak_in_flight == 2
    refusals = [error for _, error in outcomes if error is not None]
    assert {error["code"] for error in refusals} == {"key_concurrency_limit"}
    assert all("in use across" in error["message"] for error in refusals)


@pytest.mark.parametrize("connections", ["kept_alive", "fresh"])
async def test_one_request_at_a_time_under_the_limit_is_never_refused(
    database_url: str, tmp_path: Any, connections: str
) -> None:
    """`max_concurrency: 2` over 2 x 2 workers, one request at a time alternating between the
    replicas (a kept-alive connection to each, or a new connection every time): 0 refused."""
    async with cluster(
        database_url, tmp_path, {"max_concurrency": 2}, ["--base-ttft-ms", "50"]
    ) as (node, gateways, _):
        connector = aiohttp.TCPConnector(force_close=connections == "fresh")
        async with aiohttp.ClientSession(connector=connector) as session:
            outcomes = []
            for turn in range(24):
                outcomes.append(await chat(session, gateways[turn % 2]))
                await asyncio.sleep(0.1)  # a client that thinks between requests
        stats = await node.stats()
    assert [status for status, _ in outcomes] == [200] * 24, outcomes
    assert stats.completed == 24


async def test_an_outage_longer_than_a_registration_never_lets_the_limit_overshoot(
    dedicated_postgres: EmbeddedPostgres, tmp_path: Any
) -> None:
    """`max_concurrency: 4` over 2 x 2 workers under 8 clients while Postgres is down for longer
    than a worker's registration lives: the node never has more than 4 of the key's requests in
    flight, before, during or after the outage, and the key is served again once it is back."""
    async with cluster(
        dedicated_postgres.url, tmp_path, {"max_concurrency": 4}, ["--base-ttft-ms", "400"]
    ) as (node, gateways, _):
        statuses: Counter[int] = Counter()
        codes: Counter[str] = Counter()
        served_after: list[float] = []
        back_at: list[float] = []
        stop = asyncio.Event()
        chooser = random.Random(7)

        async def client() -> None:
            async with fresh_session() as session:
                while not stop.is_set():
                    try:
                        status, error = await chat(session, chooser.choice(gateways))
                    except aiohttp.ClientError:
                        status, error = 0, None
                    statuses[status] += 1
                    if error is not None:
                        codes[error["code"]] += 1
                        await asyncio.sleep(0.05)
                    elif status == 200 and back_at:
                        served_after.append(time.monotonic())

        clients = [asyncio.create_task(client()) for _ in range(8)]
        try:
            await wait_until(lambda: _served(statuses, 10), timeout=30, message="traffic")
            await asyncio.to_thread(dedicated_postgres.stop, "fast")
            await asyncio.sleep(OUTAGE_SECONDS)  # the scenario: the store is down this long
            await asyncio.to_thread(dedicated_postgres.start)
            back_at.append(time.monotonic())
            await wait_until(lambda: _count(served_after, 20), timeout=60, message="served again")
        finally:
            stop.set()
            await asyncio.gather(*clients)
        stats = await node.stats()
    assert stats.peak_in_flight <= 4, (stats.peak_in_flight, statuses, codes)
    assert set(statuses) <= {200, 429, 503}, statuses
    assert set(codes) <= {"key_concurrency_limit", "key_limit_unavailable"}, codes


async def _served(statuses: Counter[int], count: int) -> bool:
    """Whether at least `count` requests were answered 200."""
    return statuses[200] >= count


async def _count(items: list[float], count: int) -> bool:
    """Whether at least `count` items were recorded."""
    return len(items) >= count
