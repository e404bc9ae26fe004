"""No request-chosen routing: a body or headers naming another server reach only the config's."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, build_settings, chat_body

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_fields_naming_another_server_reach_only_the_configured_upstream(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory, path: str
) -> None:
    """A body full of `api_base`, `base_url`, `url`, `provider`… pointing at a second server, and
    headers doing the same, still reach only the configured node; the other sees nothing."""
    configured = await start_simulator("configured")
    other = await start_simulator("other")
    server = await start_gateway(build_settings({"configured": configured.url}))
    target = other.url
    steering: dict[str, Any] = {
        "api_base": target,
        "base_url": target,
        "api_url": target,
        "url": target + path,
        "endpoint": target + path,
        "provider": "other",
        "providers": [{"name": "other", "url": target}],
        "api_key": "sk-attacker",
        "custom_llm_provider": "openai",
        "extra_body": {"api_base": target},
        "metadata": {"api_base": target, "provider": "other"},
    }
    if path == "/v1/chat/completions":
        body = chat_body(**steering)
    else:
        body = {"model": TEST_MODEL, "prompt": "Hello", **steering}
    headers = {
        **AUTH,
        "Host": target.removeprefix("http://"),
        "X-Forwarded-Host": target.removeprefix("http://"),
        "Forwarded": f"host={target.removeprefix('http://')}",
        "x-gateway-provider": "other",
        "X-Original-URL": target + path,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url(path), data=orjson.dumps(body), headers=headers) as response,
    ):
        assert response.status == 200
        assert response.headers["x-gateway-provider"] == "configured"
    assert (await other.stats()).requests_received == 0
    received = (await configured.stats()).last_request()
    assert received.path == path
    # The body passes through (the configured node ignores the extra fields); the client's
    # bearer key and the steering headers do not.
    assert received.headers.get("Authorization") is None
    assert "X-Forwarded-Host" not in received.headers
    assert "Forwarded" not in received.headers
    assert "x-gateway-provider" not in received.headers
    assert received.headers.get("Host") != target.removeprefix("http://")


async def test_a_model_named_like_a_url_is_not_fetched(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """`model: http://other/...` is just an unknown model name: 404, and nobody is contacted."""
    configured = await start_simulator("configured")
    other = await start_simulator("other")
    server = await start_gateway(build_settings({"configured": configured.url}))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            data=orjson.dumps({**chat_body(), "model": other.url + "/v1/chat/completions"}),
            headers=AUTH,
        ) as response,
    ):
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "model_not_found"
    assert (await other.stats()).requests_received == 0
    assert (await configured.stats()).completion_requests == 0
