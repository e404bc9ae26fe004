"""Conformance under faults and edge cases: long answers, unusual but valid streams, upstream
errors and their Retry-After, a wrong provider credential — directly vs through the gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from email.utils import formatdate
from typing import Any

import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from gateway.simulator import Timing
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.conformance import Target, comparable, raw_call
from tests.support.gateway import TEST_KEY, TEST_MODEL, UPSTREAM_MODEL, build_settings

MESSAGES: list[Any] = [{"role": "user", "content": "Write a long story."}]
FIRST_EVENT_BYTES = 200 * 1024
PIECE_BYTES = 8 * 1024
Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def fake_upstream(exit_stack: AsyncExitStack, behaviour: Behaviour) -> str:
    """A real HTTP server answering chat completions with `behaviour`; its root URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", behaviour)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    exit_stack.push_async_callback(server.close)
    return str(server.make_url("")).rstrip("/")


def gateway_target(server: TestServer) -> Target:
    """The gateway under test, with the test key and the public model name."""
    return Target("gateway", str(server.make_url("")).rstrip("/"), TEST_MODEL, TEST_KEY)


def chat(model: str, **fields: Any) -> bytes:
    """A chat body for `model`."""
    return orjson.dumps({"model": model, "messages": MESSAGES, **fields})


async def test_a_long_non_streamed_generation_outlives_the_first_byte_limit(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A non-streamed answer that takes far longer than `first_byte_timeout_seconds` (a
    10-minute generation, compressed by the simulator's token rate) arrives once, unreplayed."""
    timing = Timing(base_ttft_ms=0, per_token_ms=0, tokens_per_second=25, max_num_seqs=8)
    node = await start_simulator("node-a", timing=timing)
    settings = build_settings(
        {"node-a": node.url}, extra={"routing": {"first_byte_timeout_seconds": 0.2}}
    )
    gateway = gateway_target(await start_gateway(settings))
    direct = Target("direct", node.url, UPSTREAM_MODEL, "unused")
    answers = []
    for target in (direct, gateway):
        await node.reset(clear_cache=True)  # both calls meet the same prefix cache
        async with openai.AsyncOpenAI(
            base_url=target.base_url, api_key=target.api_key, max_retries=0
        ) as client:
            completion = await client.chat.completions.create(
                model=target.model, messages=MESSAGES, max_tokens=20
            )
        answers.append(comparable(completion.model_dump(), target.model))
    assert answers[0] == answers[1]
    stats = await node.stats()
    assert stats.completion_requests == 1  # the gateway's call: nothing replayed
    finished = stats.last_request().generation_finished_at
    assert finished is not None
    assert finished - stats.last_request().received_at > 0.2  # far past the first-byte limit


async def test_a_timed_out_accepted_request_is_a_504_without_retry_after_and_not_replayed(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Past the model's own `response_timeout_seconds` the client gets 504 with no Retry-After,
    and the request is not replayed on the healthy second node."""
    held = await start_simulator("node-a")
    await held.set_faults(hold=True)
    healthy = await start_simulator("node-b")
    settings = build_settings(
        {"node-a": held.url, "node-b": healthy.url},
        extra={
            "models": [{"name": TEST_MODEL, "stickiness": "none", "response_timeout_seconds": 0.3}]
        },
    )
    gateway = gateway_target(await start_gateway(settings))
    # Send requests until one lands on the held node (round robin makes it the first or second).
    for _ in range(2):
        status, headers, body = await raw_call(
            gateway, "POST", "/v1/chat/completions", body=chat(TEST_MODEL)
        )
        if status != 200:
            break
    assert status == 504
    assert "Retry-After" not in headers
    assert orjson.loads(body)["error"]["code"] == "upstream_timeout"
    assert (await healthy.stats()).completion_requests <= 1  # only a request routed there


async def test_retry_after_timeout_replays_on_the_next_node(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With `retry_after_timeout: true` a timed-out request is answered by the next node."""
    held = await start_simulator("node-a")
    await held.set_faults(hold=True)
    healthy = await start_simulator("node-b")
    settings = build_settings(
        {"node-a": held.url, "node-b": healthy.url},
        extra={
            "routing": {"response_timeout_seconds": 0.3, "retry_after_timeout": True},
            "models": [{"name": TEST_MODEL, "stickiness": "none"}],
        },
    )
    gateway = gateway_target(await start_gateway(settings))
    for _ in range(2):
        status, headers, _ = await raw_call(
            gateway, "POST", "/v1/chat/completions", body=chat(TEST_MODEL)
        )
        assert status == 200
        assert headers["x-gateway-provider"] == "node-b"


def event_stream(*pieces: bytes) -> Behaviour:
    """An upstream that streams `pieces`, one write each, then ends the body."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
            await asyncio.sleep(0)  # separate reads on the other side, as a network would
        await response.write_eof()
        return response

    return behaviour


def chunk(model: str, content: str) -> bytes:
    """One chat chunk event naming `model`."""
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


BIG_FIRST = chunk(UPSTREAM_MODEL, "p" * FIRST_EVENT_BYTES)
STREAMS = {
    "comments-after-done": (chunk(UPSTREAM_MODEL, "hi"), b"data: [DONE]\n\n", b": bye\n\n\n"),
    "no-done": (chunk(UPSTREAM_MODEL, "hi"), chunk(UPSTREAM_MODEL, " there")),
    "200k-first-event-in-8k-pieces": (
        *(
            BIG_FIRST[start : start + PIECE_BYTES]
            for start in range(0, len(BIG_FIRST), PIECE_BYTES)
        ),
        b"data: [DONE]\n\n",
    ),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
async def test_valid_streams_pass_through_as_the_upstream_sent_them(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, name: str
) -> None:
    """Comments after `[DONE]`, no `[DONE]`, a 200 KiB first event in 8 KiB writes: the gateway
    passes each stream on as sent (only the model id renamed), and the SDK reads it the same."""
    pieces = STREAMS[name]
    upstream = await fake_upstream(exit_stack, event_stream(*pieces))
    direct = Target("direct", upstream, UPSTREAM_MODEL, "unused")
    # A first event may be as large as the body limit (`server.max_body_bytes`).
    settings = build_settings({"fake": upstream}, extra={"server": {"max_body_bytes": 1 << 20}})
    gateway = gateway_target(await start_gateway(settings))
    status, _, body = await raw_call(
        gateway, "POST", "/v1/chat/completions", body=chat(TEST_MODEL, stream=True)
    )
    assert status == 200
    sent = b"".join(pieces)
    assert body == sent.replace(orjson.dumps(UPSTREAM_MODEL), orjson.dumps(TEST_MODEL))
    read = []
    for target in (direct, gateway):
        async with openai.AsyncOpenAI(
            base_url=target.base_url, api_key=target.api_key, max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model=target.model, messages=MESSAGES, stream=True
            )
            read.append([comparable(item.model_dump(), target.model) async for item in stream])
    assert read[0] == read[1]


def failing(status: int, headers: Mapping[str, str]) -> Behaviour:
    """An upstream answering every request with `status`, `headers` and an OpenAI error."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        body = {
            "error": {
                "message": f"Upstream says {status} (see http://10.0.0.9/x).",
                "type": "server_error",
                "code": None,
            }
        }
        return web.json_response(body, status=status, headers=headers)

    return behaviour


def http_date(seconds_from_now: float) -> str:
    """An HTTP date that many seconds from now."""
    return formatdate(time.time() + seconds_from_now, usegmt=True)


# status, the upstream's headers, the least and most Retry-After expected (None: no header).
ERROR_CASES: dict[str, tuple[int, dict[str, str], int | None, int | None]] = {
    "500-no-retry-after": (500, {}, None, None),
    "503-retry-after-seconds": (503, {"Retry-After": "30"}, 30, 30),
    "503-retry-after-date": (503, {"Retry-After": "DATE+20"}, 18, 21),
    "429-retry-after-ms": (429, {"retry-after-ms": "12000"}, 12, 12),
    "429-both-forms-largest-wins": (429, {"Retry-After": "3", "retry-after-ms": "7500"}, 8, 8),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
async def test_upstream_errors_keep_their_status_message_and_retry_after(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, case: str
) -> None:
    """Every attempt failing upstream: the client sees the upstream's status and its error body
    byte for byte, as directly (issue 22: no longer rewritten, internal URLs included, as 4xx
    bodies always were), and the largest Retry-After of the upstream's forms; none when the
    upstream sent none (issue 20: the gateway used to add `Retry-After: 1` to a relayed 500)."""
    status, headers, lowest, highest = ERROR_CASES[case]
    sent = {name: http_date(20) if value == "DATE+20" else value for name, value in headers.items()}
    upstream = await fake_upstream(exit_stack, failing(status, sent))
    direct = Target("direct", upstream, UPSTREAM_MODEL, "unused")
    gateway = gateway_target(await start_gateway(build_settings({"fake": upstream})))
    seen = []
    for target in (direct, gateway):
        async with openai.AsyncOpenAI(
            base_url=target.base_url, api_key=target.api_key, max_retries=0
        ) as client:
            with pytest.raises(openai.APIStatusError) as raised:
                await client.chat.completions.create(model=target.model, messages=MESSAGES)
        seen.append(raised.value)
    assert seen[1].status_code == seen[0].status_code == status
    assert seen[1].message == seen[0].message
    assert seen[1].response.content == seen[0].response.content
    assert seen[1].body == seen[0].body
    assert "x-gateway-error" in seen[1].response.headers
    if lowest is None or highest is None:
        assert "Retry-After" not in seen[1].response.headers
    else:
        assert lowest <= int(seen[1].response.headers["Retry-After"]) <= highest


def guarded(secret: str) -> Behaviour:
    """An upstream that answers 401 unless it gets `secret` as the bearer token."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {secret}":
            body = {"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}}
            return web.json_response(body, status=401)
        answer = {
            "id": "chatcmpl-2",
            "object": "chat.completion",
            "created": 1,
            "model": UPSTREAM_MODEL,
            "choices": [],
        }
        return web.json_response(answer)

    return behaviour


async def test_a_wrong_provider_credential_fails_over_and_is_logged_as_the_providers(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """An upstream 401 for a provider's credential fails over to the healthy provider; an error
    log names the provider; with no healthy one left it is a 502 `upstream_auth_failed`."""
    upstream = await fake_upstream(exit_stack, guarded("right-secret"))
    config = build_settings({"wrong": upstream, "right": upstream}).model_dump()
    config["providers"][0]["api_key"] = "wrong-secret"
    config["providers"][1]["api_key"] = "right-secret"
    config["models"] = [{"name": TEST_MODEL, "stickiness": "none"}]
    server = await start_gateway(type(build_settings({"x": upstream})).model_validate(config))
    gateway = gateway_target(server)
    with capture_logs() as logs:
        for _ in range(2):  # round robin: one of them starts on the wrong provider
            status, headers, _ = await raw_call(
                gateway, "POST", "/v1/chat/completions", body=chat(TEST_MODEL)
            )
            assert status == 200
            assert headers["x-gateway-provider"] == "right"
    refused = [entry for entry in logs if entry["event"] == "upstream_credential_refused"]
    assert refused
    assert refused[0]["provider"] == "wrong"
    assert refused[0]["log_level"] == "error"
    assert "wrong-secret" not in repr(logs)

    only_wrong = build_settings({"wrong": upstream}).model_dump()
    only_wrong["providers"][0]["api_key"] = "wrong-secret"
    lone = gateway_target(
        await start_gateway(type(build_settings({"x": upstream})).model_validate(only_wrong))
    )
    status, _, body = await raw_call(lone, "POST", "/v1/chat/completions", body=chat(TEST_MODEL))
    assert status == 502
    assert orjson.loads(body)["error"]["code"] == "upstream_auth_failed"


async def test_a_first_event_over_the_body_limit_is_refused_before_the_client_sees_it(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """A first event larger than `server.max_body_bytes` is an unusable answer: 502, and the
    client gets the gateway's own error, not a piece of the stream."""
    upstream = await fake_upstream(
        exit_stack, event_stream(*STREAMS["200k-first-event-in-8k-pieces"])
    )
    settings = build_settings({"fake": upstream}, extra={"server": {"max_body_bytes": 64 * 1024}})
    gateway = gateway_target(await start_gateway(settings))
    status, headers, body = await raw_call(
        gateway, "POST", "/v1/chat/completions", body=chat(TEST_MODEL, stream=True)
    )
    assert status == 502
    assert "x-gateway-provider" not in headers
    assert orjson.loads(body)["error"]["code"] == "upstream_error"


async def test_the_query_string_reaches_the_upstream_as_sent(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """A client's query string (an `api-version`, Responses' `include[]`) is passed on as is."""
    seen: list[str] = []

    async def behaviour(request: web.Request) -> web.StreamResponse:
        seen.append(request.rel_url.raw_query_string)
        answer = {"id": "c", "object": "chat.completion", "model": UPSTREAM_MODEL, "choices": []}
        return web.json_response(answer)

    upstream = await fake_upstream(exit_stack, behaviour)
    gateway = gateway_target(await start_gateway(build_settings({"fake": upstream})))
    query = "api-version=2024-10-21&include%5B%5D=a%20b"
    status, _, _ = await raw_call(
        gateway, "POST", f"/v1/chat/completions?{query}", body=chat(TEST_MODEL)
    )
    assert status == 200
    assert seen == [query]


def vllm_error(status: int, shape: str) -> Behaviour:
    """An upstream answering `status` in one of vLLM's (or FastAPI's, or a proxy's) error
    shapes, naming the model id it was sent."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        model = (await request.json())["model"]
        message = f"The model `{model}` cannot serve this: see {model}."
        if shape == "html":
            page = f"<html><body>{status} Bad Gateway ({model})</body></html>"
            return web.Response(status=status, text=page, content_type="text/html")
        if shape == "fastapi":
            return web.json_response({"detail": message}, status=status)
        body = {"object": "error", "message": message, "type": "BadRequestError", "param": None}
        return web.json_response({**body, "code": status}, status=status)

    return behaviour


@pytest.mark.parametrize("status", [400, 404, 500, 503])
@pytest.mark.parametrize("shape", ["vllm", "fastapi", "html"])
async def test_upstream_error_bodies_pass_as_sent_with_only_the_model_renamed(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, status: int, shape: str
) -> None:
    """A 4xx passed on or a 5xx every attempt got: the client gets the upstream's status,
    content type and body byte for byte as directly, except that the upstream model id reads as
    the public name; no gateway summary or provider name in the body (it is in
    `x-gateway-error` for a 5xx)."""
    upstream = await fake_upstream(exit_stack, vllm_error(status, shape))
    direct = Target("direct", upstream, UPSTREAM_MODEL, "unused")
    gateway = gateway_target(await start_gateway(build_settings({"hidden-node": upstream})))
    answers = []
    for target in (direct, gateway):
        answered, headers, body = await raw_call(
            target, "POST", "/v1/chat/completions", body=chat(target.model)
        )
        answers.append((answered, headers["Content-Type"], body))
        if target is gateway:
            assert b"hidden-node" not in body
            assert ("x-gateway-error" in headers) == (status >= 500)
    expected = answers[0][2].replace(UPSTREAM_MODEL.encode(), TEST_MODEL.encode())
    assert answers[0][2] != expected  # the upstream named its model
    assert answers[1] == (status, answers[0][1], expected)


def echoing_model_id(request_body: dict[str, Any]) -> dict[str, Any]:
    """A chat answer whose generated text (content and a tool call's arguments) is the model
    id the upstream was asked for."""
    model = request_body["model"]
    arguments = orjson.dumps({"model": model}).decode()
    message = {
        "role": "assistant",
        "content": model,
        "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "f", "arguments": arguments}}
        ],
    }
    return {
        "id": "chatcmpl-9",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


async def echo_the_model_id(request: web.Request) -> web.StreamResponse:
    """An upstream whose model writes its own id, whole or as a stream of two chunks."""
    sent = await request.json()
    answer = echoing_model_id(sent)
    if not sent.get("stream"):
        return web.json_response(answer)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for text in (sent["model"], f" and {sent['model']}"):
        await response.write(chunk(sent["model"], text))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_generated_text_equal_to_the_upstream_id_reaches_the_client_unchanged(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, stream: bool
) -> None:
    """Text the model generated that equals its upstream id stays as generated; only the
    top-level `model` (each chunk's) names the public model: the gateway's answer is the
    direct one with exactly those values renamed."""
    upstream = await fake_upstream(exit_stack, echo_the_model_id)
    direct = Target("direct", upstream, UPSTREAM_MODEL, "unused")
    gateway = gateway_target(await start_gateway(build_settings({"fake": upstream})))
    bodies = []
    for target in (direct, gateway):
        status, _, body = await raw_call(
            target, "POST", "/v1/chat/completions", body=chat(target.model, stream=stream)
        )
        assert status == 200
        bodies.append(body)
    expected = bodies[0]
    for colon in (b":", b": "):  # json.dumps' spacing (whole), orjson's (chunks)
        model_member = b'"model"' + colon + orjson.dumps(UPSTREAM_MODEL)
        expected = expected.replace(model_member, b'"model"' + colon + orjson.dumps(TEST_MODEL))
    assert expected != bodies[0]
    assert bodies[1] == expected
    assert UPSTREAM_MODEL.encode() in bodies[1]  # the generated text kept it
