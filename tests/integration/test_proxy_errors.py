"""Every error path answers its documented status with OpenAI-shaped JSON, and serving goes on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from bench.launcher import free_port
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import OTHER_KEY, TEST_KEY, build_settings, chat_body
from tests.support.simulators import InProcessSimulator

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}


async def call(
    server: TestServer,
    method: str,
    path: str,
    *,
    body: bytes | AsyncIterator[bytes] | None = None,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, CIMultiDict[str], bytes]:
    """One request to the gateway; status, headers and body."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, server.make_url(path), data=body, headers=headers) as response,
    ):
        return response.status, CIMultiDict(response.headers), await response.read()


def assert_openai_error(body: bytes, code: str) -> None:
    """The body is `{"error": {"message", "type", "code"}}` with the expected code."""
    error = orjson.loads(body)["error"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["type"]
    assert error["code"] == code


async def assert_still_serving(server: TestServer) -> None:
    """A good request right after succeeds."""
    status, _, _ = await call(
        server, "POST", "/v1/chat/completions", body=orjson.dumps(chat_body()), headers=AUTH
    )
    assert status == 200


CHAT = "/v1/chat/completions"
GOOD = orjson.dumps(chat_body())
OTHER_AUTH = {"Authorization": f"Bearer {OTHER_KEY}"}
CLIENT_ERRORS = [
    ("bad-json", "POST", CHAT, b"{not json", AUTH, 400, "invalid_json"),
    ("empty-body", "POST", CHAT, b"", AUTH, 400, "invalid_json"),
    ("not-an-object", "POST", CHAT, b"[1, 2]", AUTH, 400, "invalid_request"),
    ("no-model", "POST", CHAT, b'{"messages": []}', AUTH, 400, "missing_field"),
    ("model-not-string", "POST", CHAT, b'{"model": 7}', AUTH, 400, "invalid_type"),
    ("stream-not-bool", "POST", CHAT, orjson.dumps(chat_body(stream="yes")), AUTH, 400,
     "invalid_type"),
    ("messages-not-array", "POST", CHAT, b'{"model": "test-model", "messages": "hi"}', AUTH, 400,
     "invalid_type"),
    ("no-prompt", "POST", "/v1/completions", b'{"model": "test-model"}', AUTH, 400,
     "missing_field"),
    ("no-key", "POST", CHAT, GOOD, {}, 401, "missing_api_key"),
    ("unknown-key", "POST", CHAT, GOOD, {"Authorization": "Bearer sk-nope"}, 401,
     "invalid_api_key"),
    ("wrong-scheme", "POST", CHAT, GOOD, {"Authorization": "Basic abc"}, 401, "missing_api_key"),
    ("models-no-key", "GET", "/v1/models", None, {}, 401, "missing_api_key"),
    ("model-not-allowed", "POST", CHAT, GOOD, OTHER_AUTH, 403, "model_not_allowed"),
    ("unknown-model", "POST", CHAT, orjson.dumps({**chat_body(), "model": "gpt-nope"}), AUTH, 404,
     "model_not_found"),
    ("unknown-path", "GET", "/v1/nowhere", None, AUTH, 404, "not_found"),
    ("wrong-method", "GET", CHAT, None, AUTH, 405, "method_not_allowed"),
    ("body-too-large", "POST", CHAT, orjson.dumps(chat_body("x" * 70_000)), AUTH, 413,
     "body_too_large"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"),
    [pytest.param(*case[1:], id=case[0]) for case in CLIENT_ERRORS],
)
async def test_client_error_is_openai_shaped(
    one_node: tuple[InProcessSimulator, TestServer],
    method: str,
    path: str,
    body: bytes | None,
    headers: Mapping[str, str],
    status: int,
    code: str,
) -> None:
    """Each client mistake gets its status, an OpenAI error body and a request id."""
    node, server = one_node
    answered, response_headers, response_body = await call(
        server, method, path, body=body, headers=headers
    )
    assert answered == status
    assert response_headers["Content-Type"].startswith("application/json")
    assert response_headers["x-request-id"]
    assert_openai_error(response_body, code)
    assert (await node.stats()).completion_requests == 0
    await assert_still_serving(server)


async def test_body_over_the_limit_without_content_length_is_413(
    one_node: tuple[InProcessSimulator, TestServer],
) -> None:
    """A chunked body that grows past max_body_bytes is cut off with 413."""
    _, server = one_node

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"x" * 8192

    status, _, body = await call(server, "POST", CHAT, body=chunks(), headers=AUTH)
    assert status == 413
    assert_openai_error(body, "body_too_large")
    await assert_still_serving(server)


async def test_upstream_server_error_keeps_its_status_and_message(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """When every provider answers 5xx, the client gets the last upstream's status and its own
    error body (issue 12: it used to be rewritten to 502; issue 22: the body is the upstream's,
    the gateway's code and summary are in `x-gateway-error`), no Retry-After the upstream did
    not send, and `x-should-retry: false` (issue 20: every candidate was tried)."""
    node = await start_simulator("node-a")
    await node.set_faults(error_rate=1.0)
    server = await start_gateway(build_settings({"node-a": node.url}))
    answered, headers, body = await call(
        server, "POST", "/v1/chat/completions", body=orjson.dumps(chat_body()), headers=AUTH
    )
    assert answered == 500
    assert_openai_error(body, "simulated_error")
    assert orjson.loads(body)["error"]["message"] == "Simulated upstream failure."
    assert headers["x-gateway-error"].startswith("upstream_error: ")
    assert "node-a: http_500" in headers["x-gateway-error"]
    assert "Retry-After" not in headers
    assert headers["x-should-retry"] == "false"
    await node.set_faults(error_rate=0.0)
    await assert_still_serving(server)


async def test_upstream_rate_limit_is_a_429_and_cools_the_provider(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """An upstream 429 reaches the client as a 429 with its Retry-After; the node then cools."""
    node = await start_simulator("node-a")
    await node.set_faults(rate_limit_retry_after=7)
    server = await start_gateway(build_settings({"node-a": node.url}))
    status, headers, body = await call(
        server, "POST", "/v1/chat/completions", body=orjson.dumps(chat_body()), headers=AUTH
    )
    assert status == 429
    assert headers["Retry-After"] == "7"
    assert_openai_error(body, "rate_limit_exceeded")  # the upstream's own body
    assert headers["x-gateway-error"].startswith("upstream_rate_limited: ")
    await node.set_faults(rate_limit_retry_after=None)
    status, headers, body = await call(
        server, "POST", "/v1/chat/completions", body=orjson.dumps(chat_body()), headers=AUTH
    )
    assert status == 429
    assert 1 <= int(headers["Retry-After"]) <= 7
    assert_openai_error(body, "providers_cooling")
    assert (await node.stats()).completion_requests == 1


async def test_unreachable_upstream_is_503(start_gateway: GatewayFactory) -> None:
    """With no provider reachable the client gets 503 and a Retry-After."""
    server = await start_gateway(build_settings({"node-a": f"http://127.0.0.1:{free_port()}"}))
    status, headers, body = await call(
        server, "POST", "/v1/chat/completions", body=orjson.dumps(chat_body()), headers=AUTH
    )
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert_openai_error(body, "upstream_unreachable")


async def test_upstream_too_slow_is_504(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """An upstream that does not answer a non-streamed request within the response timeout
    gives 504, without Retry-After (the request was accepted: it is not replayed)."""
    node = await start_simulator("node-a")
    await node.set_faults(hold=True)
    settings = build_settings(
        {"node-a": node.url}, extra={"routing": {"response_timeout_seconds": 0.3}}
    )
    server = await start_gateway(settings)
    status, headers, body = await call(
        server, "POST", "/v1/chat/completions", body=orjson.dumps(chat_body()), headers=AUTH
    )
    assert status == 504
    assert_openai_error(body, "upstream_timeout")
    assert "Retry-After" not in headers


async def test_upstream_client_error_passes_through_unchanged(
    one_node: tuple[InProcessSimulator, TestServer],
) -> None:
    """A 4xx from the upstream (other than 408/429) reaches the client as the upstream sent it."""
    node, server = one_node
    body = orjson.dumps({"model": "test-model", "messages": [{"role": "user"}], "max_tokens": -5})
    status, headers, answer = await call(
        server, "POST", "/v1/chat/completions", body=body, headers=AUTH
    )
    assert status == 400
    assert headers["x-gateway-provider"] == "node-a"
    assert (await node.stats()).completion_requests == 1
    assert "error" in orjson.loads(answer)


async def test_models_lists_what_the_key_may_use(
    one_node: tuple[InProcessSimulator, TestServer],
) -> None:
    """`GET /v1/models` lists exactly the models the caller's key is allowed."""
    _, server = one_node
    status, _, body = await call(server, "GET", "/v1/models", headers=AUTH)
    assert status == 200
    assert [model["id"] for model in orjson.loads(body)["data"]] == ["other-model", "test-model"]
    status, _, body = await call(
        server, "GET", "/v1/models", headers={"Authorization": f"Bearer {OTHER_KEY}"}
    )
    assert [model["id"] for model in orjson.loads(body)["data"]] == ["other-model"]
