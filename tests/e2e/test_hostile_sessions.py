"""One key flooding a worker's session table, against a real `gateway serve`: a victim key
holding no more than an equal split of the table keeps every session; the flooder churns its
own."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bench.launcher import GatewayProcess
from tests.conftest import SimulatorFactory
from tests.e2e.test_hostile_clients import start_gateway_process
from tests.support.gateway import OTHER_KEY, TEST_KEY, settings_dict

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

VICTIM_SESSIONS = 3000
CAPACITY = 2 * VICTIM_SESSIONS  # the victim holds exactly its equal split once the flood fills it
FLOOD = CAPACITY + 1000  # fills the rest of the table, then a thousand evictions
CONCURRENCY = 16


@pytest.fixture
async def gateway(
    start_simulator: SimulatorFactory, database_url: str, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """`gateway serve` (one worker) before one node, both models session-sticky."""
    node = await start_simulator("node-a")
    config = settings_dict(
        {"node-a": node.url},
        extra={
            "database": {"url": database_url},
            # Every request must be answered: a busy test machine must not shed this load.
            "server": {"load_shedding": False},
            "routing": {"session_capacity": CAPACITY},
            "models": [
                {"name": "test-model", "stickiness": "session"},
                {"name": "other-model", "stickiness": "session"},
            ],
        },
    )
    process = await start_gateway_process(config, tmp_path)
    yield process
    process.stop()


async def affinities(
    gateway: GatewayProcess, key: str, model: str, sessions: list[str]
) -> Counter[str]:
    """`x-gateway-affinity` of one chat request per session (16 at a time), counted."""
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    seen: Counter[str] = Counter()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    queue = iter(sessions)

    async def worker(session: aiohttp.ClientSession) -> None:
        for sid in queue:
            async with session.post(
                gateway.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}", "x-session-id": sid},
            ) as response:
                await response.read()
                assert response.status == 200
                seen[response.headers["x-gateway-affinity"]] += 1

    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    return seen


async def test_a_flood_leaves_a_victim_within_its_share_every_session(
    gateway: GatewayProcess,
) -> None:
    """The victim binds 3,000 sessions; another key then opens 7,000 (the table holds 6,000):
    all 3,000 of the victim's still hit, the flooder's newest are bound, its oldest evicted."""
    victim = [f"victim-{number}" for number in range(VICTIM_SESSIONS)]
    flood = [f"flood-{number}" for number in range(FLOOD)]
    assert await affinities(gateway, OTHER_KEY, "other-model", victim) == Counter(
        {"miss": VICTIM_SESSIONS}
    )
    assert await affinities(gateway, TEST_KEY, "test-model", flood) == Counter({"miss": FLOOD})
    assert await affinities(gateway, OTHER_KEY, "other-model", victim) == Counter(
        {"hit": VICTIM_SESSIONS}
    )
    newest = await affinities(gateway, TEST_KEY, "test-model", flood[-100:])
    assert newest == Counter({"hit": 100})
    oldest = await affinities(gateway, TEST_KEY, "test-model", flood[:100])
    assert oldest == Counter({"miss": 100})
