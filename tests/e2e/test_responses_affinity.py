"""Stored Responses through a 2-worker gateway: follow-ups reaching either worker all go to the
node that created the response; once that node is gone they get a clear 404-style error."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest

from bench.launcher import GatewayProcess
from tests.support.gateway import TEST_KEY, TEST_MODEL, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

FOLLOW_UPS = 16


async def fresh_connection_pid(url: str) -> int | None:
    """The pid of the worker a new connection reaches, or None while nothing answers."""
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get(url + "/healthz") as response,
        ):
            pid: int = (await response.json())["pid"]
            return pid
    except aiohttp.ClientConnectionError:
        return None


async def test_follow_ups_at_random_workers_reach_the_creating_node(
    database_url: str, tmp_path: Path
) -> None:
    """A response created through the gateway is continued, fetched and deleted through fresh
    connections (spread over both workers by the kernel): every call reaches its node; after the
    node stops, a follow-up is a 404 `response_node_gone` and the other node sees nothing."""
    async with AsyncExitStack() as stack:
        nodes = {
            name: await stack.enter_async_context(SimulatorProcess(name))
            for name in ("node-a", "node-b")
        }
        config = settings_dict({name: node.url for name, node in nodes.items()})
        config["database"] = {"url": database_url, "pool_min_size": 1, "pool_max_size": 4}
        config["affinity"] = {"lookup_timeout_ms": 500, "claim_timeout_ms": 2000}
        gateway = GatewayProcess(config, tmp_path, workers=2)
        gateway.start()
        stack.callback(gateway.stop)
        pids: set[int] = set()

        async def both_workers_seen() -> bool:
            pid = await fresh_connection_pid(gateway.url)
            if pid is not None:
                pids.add(pid)
            return len(pids) == 2

        await wait_until(both_workers_seen, timeout=60, message="both workers answering")

        def client() -> openai.AsyncOpenAI:
            # A new connection pool per call: the kernel picks the worker each time.
            return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)

        async with client() as first:
            created = await first.responses.with_raw_response.create(
                model=TEST_MODEL, input="Remember this."
            )
        home = created.headers["x-gateway-provider"]
        other = next(name for name in nodes if name != home)
        latest = created.parse().id
        for _ in range(FOLLOW_UPS):
            async with client() as each:
                follow = await each.responses.with_raw_response.create(
                    model=TEST_MODEL, input="And then?", previous_response_id=latest
                )
                assert follow.headers["x-gateway-provider"] == home
                latest = follow.parse().id
                fetched = await each.responses.retrieve(latest)
                assert fetched.model == TEST_MODEL
        async with client() as each:
            await each.responses.delete(latest)
        other_stats = await nodes[other].stats()
        assert other_stats.requests_by_path.get("/v1/responses", 0) == 0

        await nodes[home].terminate()
        async with aiohttp.ClientSession() as session:
            body = orjson.dumps(
                {"model": TEST_MODEL, "input": "Still there?", "previous_response_id": latest}
            )
            async with session.post(
                gateway.url + "/v1/responses",
                data=body,
                headers={"Authorization": f"Bearer {TEST_KEY}", "Content-Type": "application/json"},
            ) as response:
                status, answer = response.status, await response.json()
        assert status == 404
        assert answer["error"]["code"] == "response_node_gone"
        assert (await nodes[other].stats()).requests_by_path.get("/v1/responses", 0) == 0
