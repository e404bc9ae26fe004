"""Postgres stopped under traffic: requests keep being served, then shared affinity resumes."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from affinity_store.embedded import EmbeddedPostgres
from gateway.config import Settings
from gateway.operations.app_keys import AFFINITY
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import TEST_KEY, chat_body, settings_dict

pytestmark = pytest.mark.timeout(120)
COOLOFF_SECONDS = 1.0


async def chat(session: aiohttp.ClientSession, server: TestServer) -> tuple[int, str, float, str]:
    """One chat request: status, affinity header, its duration in seconds, and the provider."""
    started = time.monotonic()
    async with session.post(
        server.make_url("/v1/chat/completions"),
        data=orjson.dumps(chat_body(max_tokens=2)),
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    ) as response:
        await response.read()
        return (
            response.status,
            response.headers["x-gateway-affinity"],
            time.monotonic() - started,
            response.headers["x-gateway-provider"],
        )


async def test_requests_survive_a_database_outage_and_affinity_resumes(
    dedicated_postgres: EmbeddedPostgres,
    start_simulator: SimulatorFactory,
    start_gateway: GatewayFactory,
) -> None:
    """Store down: served degraded, breaker open; store back: hits again after cool-off + probe."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b")]
    config = settings_dict(
        {node.name: node.url for node in nodes},
        extra={
            "database": {"url": dedicated_postgres.url, "pool_min_size": 1},
            "affinity": {
                "breaker_cooloff_seconds": COOLOFF_SECONDS,
                "local_cache_seconds": 0,
                "lookup_timeout_ms": 200,
            },
        },
    )
    server = await start_gateway(Settings.model_validate(config))
    affinity = server.app[AFFINITY]
    async with aiohttp.ClientSession() as session:
        assert (await chat(session, server))[:2] == (200, "miss")
        status, kind, _, bound = await chat(session, server)
        assert (status, kind) == (200, "hit")

        await asyncio.to_thread(dedicated_postgres.stop, "fast")
        outcomes = [await chat(session, server) for _ in range(20)]
        assert [outcome[0] for outcome in outcomes] == [200] * 20
        assert {outcome[1] for outcome in outcomes} == {"degraded"}
        assert max(outcome[2] for outcome in outcomes) < 1.0  # never waits on the database
        assert {outcome[3] for outcome in outcomes} == {bound}  # the last binding seen still rules
        assert affinity.breaker.state() in {"open", "half_open"}
        async with session.get(server.make_url("/readyz")) as ready:
            assert ready.status == 200  # the store being down does not make the gateway unready

        await asyncio.to_thread(dedicated_postgres.start)
        restarted = time.monotonic()
        kinds: list[str] = []
        while time.monotonic() - restarted < COOLOFF_SECONDS + 5:
            _, kind, _, _ = await chat(session, server)
            kinds.append(kind)
            if kind == "hit":
                break
            await asyncio.sleep(0.05)
        assert kinds[-1] == "hit", kinds
        assert time.monotonic() - restarted < COOLOFF_SECONDS + 5
        assert affinity.breaker.state() == "closed"
