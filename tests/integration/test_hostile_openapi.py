"""`GET /openapi.json` serves docs/openapi.yaml as JSON; answers it documents keep to it."""

from __future__ import annotations

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from gateway.edge.openapi import load_spec
from gateway.simulator import Faults
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import TEST_KEY, build_settings, chat_body
from tests.support.simulators import InProcessSimulator


async def test_the_served_document_is_the_spec_and_needs_no_key(
    one_node: tuple[InProcessSimulator, TestServer],
) -> None:
    """Twice, without a key: the same JSON document as the YAML spec, with a request id."""
    _, server = one_node
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(server.make_url("/openapi.json")) as response:
                assert response.status == 200
                assert response.content_type == "application/json"
                assert response.headers["x-request-id"]
                assert await response.json() == load_spec()


async def test_a_not_ready_answer_is_also_an_openai_error(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """While every provider cools, /readyz is 503 with `status`, `reason` and an `error` object."""
    node = await start_simulator("node-a", faults=Faults(rate_limit_retry_after=30))
    server = await start_gateway(build_settings({"node-a": node.url}))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/chat/completions"),
            data=orjson.dumps(chat_body()),
            headers={"Authorization": f"Bearer {TEST_KEY}"},
        ) as response:
            assert response.status == 429
        async with session.get(server.make_url("/readyz")) as response:
            assert response.status == 503
            body = await response.json()
    assert body["status"] == "not ready"
    error = body["error"]
    assert error["message"]
    assert error["type"]
    assert error["code"]
