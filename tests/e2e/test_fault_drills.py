"""A node killed under steady load: no client request fails, and the node serves again later."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.config import Settings
from gateway.operations.app_keys import RUNTIME
from tests.conftest import GatewayFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
CLIENTS = 50


async def test_killing_one_of_three_nodes_under_load_fails_no_request(
    start_gateway: GatewayFactory,
) -> None:
    """50 clients keep sending while a node is killed and restarted: zero failed requests."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                SimulatorProcess(name, ["--base-ttft-ms", "5", "--tokens-per-second", "400"])
            )
            for name in ("node-a", "node-b", "node-c")
        ]
        config = settings_dict(
            {node.name: node.url for node in nodes},
            extra={
                "models": [{"name": TEST_MODEL, "stickiness": "none"}],
                "routing": {"cooldown_seconds": 1, "connect_timeout_seconds": 1},
            },
        )
        server = await start_gateway(Settings.model_validate(config))
        health = server.app[RUNTIME].proxy.router.health
        statuses: list[int] = []
        stop = asyncio.Event()

        async def client(session: aiohttp.ClientSession) -> None:
            deadline = time.monotonic() + 60  # bounded whatever happens
            while not stop.is_set() and time.monotonic() < deadline:
                statuses.append(await send(session, server))

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            clients = [asyncio.create_task(client(session)) for _ in range(CLIENTS)]
            try:
                await wait_until(lambda: len(statuses) >= 200, timeout=30, message="warm traffic")
                victim = nodes[0]
                await victim.kill()
                await wait_until(
                    lambda: health.cooling(victim.name), timeout=15, message="the dead node to cool"
                )
                sent_while_dead = len(statuses)
                await wait_until(
                    lambda: len(statuses) >= sent_while_dead + 200,
                    timeout=30,
                    message="traffic while the node is dead",
                )
                await victim.start()
                await wait_until(
                    lambda: _served(victim), timeout=30, message="the restarted node to serve"
                )
            finally:
                stop.set()
                await asyncio.gather(*clients)
        failed = [status for status in statuses if status != 200]
        assert failed == [], f"{len(failed)} of {len(statuses)} requests failed"


async def send(session: aiohttp.ClientSession, server: TestServer) -> int:
    """One small chat completion; its status."""
    async with session.post(
        server.make_url("/v1/chat/completions"),
        data=orjson.dumps(chat_body(max_tokens=4)),
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    ) as response:
        await response.read()
        return response.status


async def _served(node: SimulatorProcess) -> bool:
    return (await node.stats()).completed > 0
