"""What reaches the upstream and what comes back: bodies, headers, request ids, failover."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import orjson
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from bench.launcher import free_port
from gateway.config import Settings
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.conformance import post_until_broken
from tests.support.gateway import (
    TEST_KEY,
    TEST_MODEL,
    UPSTREAM_MODEL,
    build_settings,
    chat_body,
    settings_dict,
)
from tests.support.polling import wait_until
from tests.support.simulators import InProcessSimulator

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
NOT_STICKY = {"models": [{"name": TEST_MODEL, "stickiness": "none"}]}


async def post_chat(
    server: TestServer, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    """POST a chat body to the gateway; return status, headers and body."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            data=body,
            headers={**AUTH, "Content-Type": "application/json", **(headers or {})},
        ) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


async def test_model_is_rewritten_to_the_upstream_id_and_credentials_are_swapped(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """The upstream sees its own model id and the provider's key, never the client's key, and
    no client header outside the allow-list."""
    node = await start_simulator("node-a")
    config = settings_dict({"node-a": node.url})
    config["providers"][0]["api_key"] = "upstream-credential-xyz"
    server = await start_gateway(Settings.model_validate(config))
    status, _, _ = await post_chat(
        server, orjson.dumps(chat_body()), {"Connection": "keep-alive", "X-Custom": "dropped"}
    )
    assert status == 200
    seen = (await node.stats()).last_request()
    assert orjson.loads(seen.body)["model"] == UPSTREAM_MODEL
    assert seen.headers["Authorization"] == "Bearer upstream-credential-xyz"
    assert TEST_KEY not in str(dict(seen.headers))
    assert "X-Custom" not in seen.headers


async def test_body_is_forwarded_byte_for_byte_when_the_model_id_is_unchanged(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With no model rewrite the upstream receives exactly the client's bytes."""
    node = await start_simulator("node-a")
    server = await start_gateway(build_settings({"node-a": node.url}, upstream_model=TEST_MODEL))
    body = b'{"model":  "test-model", "messages": [{"role": "user", "content": "h\\u00e9"}] }'
    status, _, _ = await post_chat(server, body)
    assert status == 200
    seen = (await node.stats()).last_request()
    assert seen.body == body
    assert "Authorization" not in seen.headers


async def test_well_formed_request_id_is_kept_and_sent_upstream(
    one_node: tuple[InProcessSimulator, TestServer],
) -> None:
    """A valid incoming x-request-id is echoed back and forwarded to the upstream."""
    node, server = one_node
    status, headers, _ = await post_chat(
        server, orjson.dumps(chat_body()), {"x-request-id": "client-id-123"}
    )
    assert status == 200
    assert headers["x-request-id"] == "client-id-123"
    assert (await node.stats()).last_request().headers["x-request-id"] == "client-id-123"


async def test_malformed_request_id_is_replaced(
    one_node: tuple[InProcessSimulator, TestServer],
) -> None:
    """An x-request-id with unsafe characters is replaced by a fresh one: the worker's random
    16-hex-digit prefix and its counter (the README's format)."""
    _, server = one_node
    _, headers, _ = await post_chat(
        server, orjson.dumps(chat_body()), {"x-request-id": "bad id with spaces"}
    )
    assert re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+", headers["x-request-id"])
    _, again, _ = await post_chat(
        server, orjson.dumps(chat_body()), {"x-request-id": "bad id with spaces"}
    )
    assert again["x-request-id"] != headers["x-request-id"]
    assert again["x-request-id"].split("-")[0] == headers["x-request-id"].split("-")[0]


async def test_failing_node_is_skipped_for_the_next_one(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A 5xx before the first byte moves the request to the next provider."""
    broken = await start_simulator("node-a")
    healthy = await start_simulator("node-b")
    await broken.set_faults(error_rate=1.0)
    server = await start_gateway(
        build_settings({"node-a": broken.url, "node-b": healthy.url}, extra=NOT_STICKY)
    )
    for _ in range(4):
        status, headers, _ = await post_chat(server, orjson.dumps(chat_body()))
        assert status == 200
        assert headers["x-gateway-provider"] == "node-b"
    assert (await broken.stats()).completion_requests >= 1


async def test_unreachable_node_is_skipped_for_the_next_one(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A connection refused moves the request to the next provider."""
    healthy = await start_simulator("node-b")
    dead_url = f"http://127.0.0.1:{free_port()}"
    server = await start_gateway(
        build_settings({"node-a": dead_url, "node-b": healthy.url}, extra=NOT_STICKY)
    )
    for _ in range(3):
        status, headers, _ = await post_chat(server, orjson.dumps(chat_body()))
        assert status == 200
        assert headers["x-gateway-provider"] == "node-b"


async def test_requests_without_stickiness_take_turns_across_providers(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With stickiness `none`, the least recently started provider goes first: round robin."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b", "node-c")]
    server = await start_gateway(
        build_settings({node.name: node.url for node in nodes}, extra=NOT_STICKY)
    )
    for _ in range(6):
        status, _, _ = await post_chat(server, orjson.dumps(chat_body()))
        assert status == 200
    assert [(await node.stats()).completed for node in nodes] == [2, 2, 2]


async def test_stream_dropped_mid_way_ends_with_an_error_event(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Chunks already sent reach the client, then an OpenAI-style error line, then a broken
    transfer (no chunked end)."""
    node = await start_simulator("node-a")
    await node.set_faults(drop_after_chunks=3)
    server = await start_gateway(build_settings({"node-a": node.url}))
    status, headers, body, broken = await asyncio.wait_for(
        post_until_broken(
            str(server.make_url("/v1/chat/completions")),
            orjson.dumps(chat_body(stream=True, max_tokens=10)),
            AUTH,
        ),
        timeout=10,
    )
    assert status == 200
    assert broken
    assert headers["x-gateway-provider"] == "node-a"
    events = [event for event in body.split(b"\n\n") if event.strip()]
    assert len(events) >= 2
    assert all(event.startswith(b"data: ") for event in events)
    final = orjson.loads(events[-1].removeprefix(b"data: "))
    assert final["error"]["code"] == "upstream_dropped"
    assert b"[DONE]" not in body
    assert orjson.loads(events[0].removeprefix(b"data: "))["object"] == "chat.completion.chunk"


async def test_client_disconnect_mid_stream_cancels_the_upstream(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Closing the client connection mid-stream makes the simulator see a cancellation."""
    from gateway.simulator import Timing

    node = await start_simulator(
        "node-a", timing=Timing(base_ttft_ms=0, per_token_ms=0, tokens_per_second=20)
    )
    server = await start_gateway(build_settings({"node-a": node.url}))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            server.make_url("/v1/chat/completions"),
            data=orjson.dumps(chat_body(stream=True, max_tokens=200)),
            headers=AUTH,
        )
        assert response.status == 200
        await response.content.readany()
        response.close()
    await wait_until(
        lambda: _cancelled(node), timeout=5, message="the simulator to observe the cancellation"
    )
    stats = await node.stats()
    assert stats.in_flight == 0
    assert stats.completed == 0


async def _cancelled(node: InProcessSimulator) -> bool:
    return (await node.stats()).cancelled >= 1


async def test_model_name_reaches_only_its_own_providers(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A request is only sent to providers that serve the requested model."""
    node_a = await start_simulator("node-a")
    node_b = await start_simulator("node-b")
    config = settings_dict({"node-a": node_a.url, "node-b": node_b.url})
    config["providers"][1]["models"] = {"other-model": "other"}
    server = await start_gateway(Settings.model_validate(config))
    for _ in range(3):
        status, headers, _ = await post_chat(server, orjson.dumps(chat_body()))
        assert status == 200
        assert headers["x-gateway-provider"] == "node-a"
    assert (await node_b.stats()).completion_requests == 0
