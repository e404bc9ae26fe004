"""The edge's config fields through the real `gateway serve`: `cors_allow_origins`,
`response_timeout_seconds` and `retry_after_timeout`, as config.example.yaml describes them."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import orjson
import pytest

from bench.launcher import GatewayProcess
from tests.support.gateway import TEST_KEY, TEST_MODEL, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ORIGIN = "https://app.example.com"


async def test_cors_and_the_response_timeout_hold_in_a_served_gateway(
    database_url: str, tmp_path: Path
) -> None:
    """A served gateway answers a listed origin's preflight and tags its answers; a held node's
    non-streamed answer ends in a 504 without Retry-After after `response_timeout_seconds`, and
    the request is not replayed on the other node (`retry_after_timeout: false`)."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(SimulatorProcess(name)) for name in ("node-a", "node-b")
        ]
        config = settings_dict({node.name: node.url for node in nodes})
        config["database"] = {"url": database_url}
        config["server"]["cors_allow_origins"] = [ORIGIN]
        config["routing"] |= {"response_timeout_seconds": 0.5, "retry_after_timeout": False}
        gateway = GatewayProcess(config, tmp_path)
        gateway.start()
        stack.callback(gateway.stop)
        async with aiohttp.ClientSession() as session:

            async def answers() -> bool:
                try:
                    async with session.get(gateway.url + "/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(answers, timeout=30, message="the gateway to answer")
            preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
            async with session.options(
                gateway.url + "/v1/chat/completions", headers=preflight
            ) as response:
                assert response.status == 204
                assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
            for node in nodes:  # whichever is tried first holds the request
                await node.set_faults(hold=True)
            async with session.post(
                gateway.url + "/v1/chat/completions",
                data=orjson.dumps(chat_body()),
                headers={"Authorization": f"Bearer {TEST_KEY}", "Origin": ORIGIN},
            ) as response:
                status, headers, body = response.status, response.headers, await response.read()
        assert status == 504
        assert "Retry-After" not in headers
        assert headers["Access-Control-Allow-Origin"] == ORIGIN
        assert headers["x-request-id"]
        assert orjson.loads(body)["error"]["code"] == "upstream_timeout"
        asked = [(await node.stats()).completion_requests for node in nodes]
        assert sorted(asked) == [0, 1]
        assert TEST_MODEL in gateway.log()
