"""Client conventions: CORS (off by default), `api-key` / `x-api-key` headers, the response
header allow-list, and the gateway's own `x-ratelimit-*` headers."""

from __future__ import annotations

from contextlib import AsyncExitStack

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.conformance import Target, raw_call, sse_payloads
from tests.support.gateway import TEST_KEY, TEST_MODEL, UPSTREAM_MODEL, build_settings

ORIGIN = "https://app.example.com"
BODY = orjson.dumps({"model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}]})
STREAM_BODY = orjson.dumps(
    {"model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
)


def target(server: TestServer, api_key: str = TEST_KEY) -> Target:
    """The gateway as a call target."""
    return Target("gateway", str(server.make_url("")).rstrip("/"), TEST_MODEL, api_key)


async def test_cors_is_off_by_default(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Without `cors_allow_origins` no answer carries CORS headers and preflights are refused."""
    node = await start_simulator("node-a")
    gateway = target(await start_gateway(build_settings({"node-a": node.url})))
    status, headers, _ = await raw_call(
        gateway, "POST", "/v1/chat/completions", body=BODY, headers={"Origin": ORIGIN}
    )
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    status, headers, _ = await raw_call(
        gateway, "OPTIONS", "/v1/chat/completions", headers=preflight
    )
    assert status == 405
    assert "Access-Control-Allow-Origin" not in headers


async def test_cors_allows_the_configured_origins_on_answers_streams_and_errors(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A listed origin gets a preflight without a key and CORS headers on answers, streams and
    errors; another origin gets none."""
    node = await start_simulator("node-a")
    settings = build_settings(
        {"node-a": node.url}, extra={"server": {"cors_allow_origins": [ORIGIN]}}
    )
    server = await start_gateway(settings)
    gateway = target(server)
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    status, headers, _ = await raw_call(
        target(server, ""), "OPTIONS", "/v1/chat/completions", headers=preflight
    )
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    for body, key in ((BODY, TEST_KEY), (STREAM_BODY, TEST_KEY), (BODY, "sk-wrong")):
        status, headers, _ = await raw_call(
            target(server, key),
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Origin": ORIGIN},
        )
        assert headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "x-request-id" in headers["Access-Control-Expose-Headers"]
    status, headers, _ = await raw_call(
        gateway,
        "POST",
        "/v1/chat/completions",
        body=BODY,
        headers={"Origin": "https://evil.example.com"},
    )
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers


async def test_api_key_and_x_api_key_headers_authenticate_and_stay_at_the_gateway(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """`api-key` and `x-api-key` work like `Authorization: Bearer`, and never reach upstream."""
    node = await start_simulator("node-a")
    server = await start_gateway(build_settings({"node-a": node.url}))
    anonymous = target(server, "")
    for header in ("api-key", "x-api-key"):
        status, _, _ = await raw_call(
            anonymous,
            "POST",
            "/v1/chat/completions",
            body=BODY,
            headers={"Authorization": "", header: TEST_KEY},
        )
        assert status == 200
        received = (await node.stats()).last_request().headers
        assert header not in received
        assert "Authorization" not in received
    status, _, body = await raw_call(
        anonymous, "POST", "/v1/chat/completions", body=BODY, headers={"x-api-key": "sk-nope"}
    )
    assert status == 401
    assert orjson.loads(body)["error"]["code"] == "invalid_api_key"


async def test_upstream_headers_pass_through_an_allow_list(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """Upstream account headers (organisation, rate limits, cookies) never reach the client;
    its request id and processing time arrive under `x-upstream-*`; the key's own concurrency
    limit is told in the gateway's `x-ratelimit-*` headers."""

    async def hosted(request: web.Request) -> web.StreamResponse:
        answer = {"id": "c", "object": "chat.completion", "model": UPSTREAM_MODEL, "choices": []}
        return web.json_response(
            answer,
            headers={
                "openai-organization": "acme-internal",
                "x-ratelimit-limit-requests": "10000",
                "x-ratelimit-remaining-tokens": "5",
                "set-cookie": "session=1",
                "x-request-id": "req_upstream_1",
                "openai-processing-ms": "42",
            },
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", hosted)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    exit_stack.push_async_callback(upstream.close)
    config = build_settings({"hosted": str(upstream.make_url("")).rstrip("/")}).model_dump()
    config["keys"][0]["max_concurrency"] = 5
    server = await start_gateway(type(build_settings({"x": "http://h"})).model_validate(config))
    status, headers, body = await raw_call(
        target(server), "POST", "/v1/chat/completions", body=BODY
    )
    assert status == 200
    assert orjson.loads(body)["model"] == TEST_MODEL
    assert "openai-organization" not in headers
    assert "set-cookie" not in headers
    assert headers["x-upstream-request-id"] == "req_upstream_1"
    assert headers["x-upstream-processing-ms"] == "42"
    assert headers["x-request-id"] != "req_upstream_1"
    assert headers["x-ratelimit-limit-concurrency"] == "5"
    assert headers["x-ratelimit-remaining-concurrency"] == "4"
    assert "x-ratelimit-limit-requests" not in headers
    assert "x-ratelimit-remaining-tokens" not in headers


async def test_every_stream_event_names_the_auto_models_choice(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With the org's `auto` model, answers name the resolved public model, never upstream ids."""
    node = await start_simulator("node-a")
    config = build_settings({"node-a": node.url}).model_dump()
    config["orgs"] = [
        {"name": "acme", "auto_model": {"enabled": True, "fallback_model": TEST_MODEL}}
    ]
    config["keys"][0]["org"] = "acme"
    server = await start_gateway(type(build_settings({"x": "http://h"})).model_validate(config))
    body = orjson.dumps(
        {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    status, headers, answer = await raw_call(
        target(server), "POST", "/v1/chat/completions", body=body
    )
    assert status == 200
    assert headers["x-gateway-resolved-model"] == TEST_MODEL
    chunks = [payload for payload in sse_payloads(answer) if payload != "[DONE]"]
    assert chunks
    assert {chunk["model"] for chunk in chunks} == {TEST_MODEL}


TRACE_CONTEXT = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=opaque,other=1",
}


async def test_trace_context_passes_through_both_ways_as_it_does_directly(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """`traceparent` and `tracestate` reach the upstream as the client sent them, and the
    upstream's own trace context comes back to the client: the same directly and through the
    gateway."""
    seen: list[dict[str, str]] = []

    async def traced(request: web.Request) -> web.StreamResponse:
        seen.append({name: request.headers.get(name, "") for name in TRACE_CONTEXT})
        answer = {"id": "c", "object": "chat.completion", "model": UPSTREAM_MODEL, "choices": []}
        return web.json_response(
            answer,
            headers={
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01",
                "tracestate": "engine=1",
            },
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", traced)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    exit_stack.push_async_callback(upstream.close)
    root = str(upstream.make_url("")).rstrip("/")
    gateway = target(await start_gateway(build_settings({"hosted": root})))
    direct = Target("direct", root, UPSTREAM_MODEL, "unused")
    answered = []
    for where in (direct, gateway):
        body = orjson.dumps({"model": where.model, "messages": [{"role": "user", "content": "hi"}]})
        status, headers, _ = await raw_call(
            where, "POST", "/v1/chat/completions", body=body, headers=TRACE_CONTEXT
        )
        assert status == 200
        answered.append({name: headers.get(name) for name in TRACE_CONTEXT})
    assert seen == [TRACE_CONTEXT, TRACE_CONTEXT]
    assert answered[0] == answered[1]
    assert answered[1]["tracestate"] == "engine=1"
