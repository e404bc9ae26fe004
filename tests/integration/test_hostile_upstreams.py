"""Broken upstreams: each hostile answer becomes a 502/504 (or an SSE error event once a stream
started), a healthy node takes over where there is one, and the worker keeps serving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.dispatch.dispatcher import MAX_RESPONSE_BYTES
from gateway.dispatch.upstream import MAX_SSE_EVENT_BYTES
from gateway.simulator import Faults
from gateway.simulator.options import Mode
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.conformance import post_until_broken
from tests.support.gateway import TEST_KEY, TEST_MODEL, build_settings, chat_body

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
FIRST_BYTE_TIMEOUT = 0.5
HOSTILE_MODES = [mode for mode in Mode if mode is not Mode.NORMAL]
EXPECTED_STATUS: dict[Mode, int] = {
    mode: 504 if mode is Mode.HANG_AFTER_HEADERS else 502 for mode in HOSTILE_MODES
}
# A well-formed first event, as a vLLM node sends it.
FIRST_EVENT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
    b'"model":"m","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
)


def settings_for(upstreams: Mapping[str, str], **routing: Any) -> Any:
    """Settings with short first-byte and response timeouts and no stickiness, so nodes
    alternate."""
    return build_settings(
        upstreams,
        extra={
            "routing": {
                "first_byte_timeout_seconds": FIRST_BYTE_TIMEOUT,
                "response_timeout_seconds": FIRST_BYTE_TIMEOUT,
                **routing,
            },
            "models": [{"name": TEST_MODEL, "stickiness": "none"}],
        },
    )


async def ask(
    url: str, *, stream: bool, headers: Mapping[str, str] | None = None
) -> tuple[int, Mapping[str, str], bytes]:
    """One chat completion through the gateway; status, headers and the whole body."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/chat/completions",
            data=orjson.dumps(chat_body(stream=stream, max_tokens=4)),
            headers={**AUTH, **(headers or {})},
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def assert_gateway_error(headers: Mapping[str, str], body: bytes, code: str) -> None:
    """The gateway's own OpenAI-shaped error, not an upstream answer passed through."""
    assert "x-gateway-provider" not in headers
    error = orjson.loads(body)["error"]
    assert error["message"]
    assert error["type"]
    assert error["code"] == code


def sse_events(body: bytes) -> list[bytes]:
    """The `data:` payloads of an event stream, in order."""
    return [
        line.removeprefix(b"data:").strip()
        for line in body.splitlines()
        if line.startswith(b"data:")
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("mode", HOSTILE_MODES, ids=[mode.value for mode in HOSTILE_MODES])
async def test_a_hostile_only_node_gets_the_gateways_own_error_and_serving_goes_on(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory, mode: Mode, stream: bool
) -> None:
    """Invalid JSON, HTML, broken SSE, an endless body or silence after the headers never reach
    the client: 502 `upstream_error` (504 for silence), within the deadlines."""
    node = await start_simulator("node-a", faults=Faults(mode=mode))
    server = await start_gateway(settings_for({"node-a": node.url}, allowed_fails=100))
    url = str(server.make_url(""))
    started = time.monotonic()
    status, headers, body = await ask(url, stream=stream)
    took = time.monotonic() - started
    assert status == EXPECTED_STATUS[mode]
    code = "upstream_timeout" if mode is Mode.HANG_AFTER_HEADERS else "upstream_error"
    assert_gateway_error(headers, body, code)
    assert took < 2 * FIRST_BYTE_TIMEOUT + 5  # bounded by the deadlines, not by the upstream
    await node.set_faults(mode="normal")
    status, headers, _ = await ask(url, stream=stream)
    assert status == 200
    assert headers["x-gateway-provider"] == "node-a"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("mode", HOSTILE_MODES, ids=[mode.value for mode in HOSTILE_MODES])
async def test_a_healthy_node_takes_over_from_a_hostile_one(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory, mode: Mode, stream: bool
) -> None:
    """With a hostile and a healthy node, every request succeeds from the healthy one, although
    the hostile one is tried (nodes alternate) until it cools down (timeouts are replayed here:
    `retry_after_timeout`)."""
    hostile = await start_simulator("node-a", faults=Faults(mode=mode))
    healthy = await start_simulator("node-b")
    server = await start_gateway(
        settings_for({"node-a": hostile.url, "node-b": healthy.url}, retry_after_timeout=True)
    )
    url = str(server.make_url(""))
    for _ in range(4):
        status, headers, body = await ask(url, stream=stream)
        assert status == 200
        assert headers["x-gateway-provider"] == "node-b"
        if stream:
            assert sse_events(body)[-1] == b"[DONE]"
        else:
            assert orjson.loads(body)["object"] == "chat.completion"
    assert (await hostile.stats()).completion_requests >= 1


Behaviour = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def start_fake_upstream(exit_stack: AsyncExitStack, behaviour: Behaviour) -> str:
    """A real server on a free port answering completions with `behaviour`; its URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", behaviour)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    exit_stack.push_async_callback(server.close)
    return str(server.make_url("")).rstrip("/")


async def stream_then(request: web.Request, rest: bytes) -> web.StreamResponse:
    """A 200 event stream: a good first event, then `rest`, then the end of the body."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(FIRST_EVENT)
    await response.write(rest)
    await response.write_eof()
    return response


MID_STREAM_BREAKS = [
    pytest.param(b"x" * (MAX_SSE_EVENT_BYTES + 10), id="event-over-the-size-limit"),
]
# Streams that end cleanly however they end: the upstream's to decide, passed through as sent.
CLEAN_ENDINGS = [
    pytest.param(b'data: {"choices": []}\n\n', id="ends-without-done"),
    pytest.param(b"data: [DONE]", id="done-never-terminated"),
    pytest.param(b"data: [DONE]\n\n: keep-alive\n\n\n", id="comment-and-blank-after-done"),
]


@pytest.mark.parametrize("rest", CLEAN_ENDINGS)
async def test_a_stream_that_ends_cleanly_passes_through_as_sent(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, rest: bytes
) -> None:
    """A stream that ends without `[DONE]`, or with comments and blank lines after it, reaches
    the client byte for byte, with no error event (issue 12)."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        return await stream_then(request, rest)

    upstream = await start_fake_upstream(exit_stack, behaviour)
    server = await start_gateway(settings_for({"fake": upstream}))
    status, _, body = await ask(str(server.make_url("")), stream=True)
    assert status == 200
    assert body == FIRST_EVENT + rest


@pytest.mark.parametrize("rest", MID_STREAM_BREAKS)
async def test_a_stream_that_goes_wrong_after_it_started_ends_with_an_error_event(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, rest: bytes
) -> None:
    """After the first event reached the client nothing is retried: the stream ends with an
    OpenAI-style error line and a broken transfer, and no oversized event is passed on."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        return await stream_then(request, rest)

    upstream = await start_fake_upstream(exit_stack, behaviour)
    server = await start_gateway(settings_for({"fake": upstream}))
    status, headers, body, broken = await post_until_broken(
        str(server.make_url("/v1/chat/completions")),
        orjson.dumps(chat_body(stream=True, max_tokens=4)),
        AUTH,
    )
    assert status == 200
    assert broken
    assert headers["x-gateway-provider"] == "fake"
    assert body.startswith(FIRST_EVENT)
    assert body.count(b"x") <= MAX_SSE_EVENT_BYTES
    error = orjson.loads(sse_events(body)[-1])["error"]
    assert error["code"] == "upstream_malformed"
    assert error["message"]


async def test_a_well_terminated_stream_passes_through_byte_for_byte(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """The framing checks change nothing on a good stream."""
    rest = b'data: {"choices": []}\n\n' * 50 + b"data: [DONE]\n\n"

    async def behaviour(request: web.Request) -> web.StreamResponse:
        return await stream_then(request, rest)

    upstream = await start_fake_upstream(exit_stack, behaviour)
    server = await start_gateway(settings_for({"fake": upstream}))
    status, _, body = await ask(str(server.make_url("")), stream=True)
    assert status == 200
    assert body == FIRST_EVENT + rest


async def test_a_large_whole_answer_arrives_complete(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """A 4 MiB JSON answer sent in many chunks reaches the client whole (it used to be cut at
    the first read)."""
    answer = orjson.dumps(
        {
            "id": "chatcmpl-big",
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "y" * 4_000_000}}],
        }
    )

    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(answer), 16384):
            await response.write(answer[start : start + 16384])
        await response.write_eof()
        return response

    upstream = await start_fake_upstream(exit_stack, behaviour)
    server = await start_gateway(settings_for({"fake": upstream}))
    status, _, body = await ask(str(server.make_url("")), stream=False)
    assert status == 200
    assert body == answer


async def test_an_announced_oversized_answer_is_refused_without_reading_it(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """A Content-Length over MAX_RESPONSE_BYTES is a 502 at once, not after the body (which
    here never comes)."""

    never = asyncio.Event()

    async def behaviour(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = MAX_RESPONSE_BYTES + 1
        await response.prepare(request)
        await response.write(b"{")
        await never.wait()
        return response

    upstream = await start_fake_upstream(exit_stack, behaviour)
    server = await start_gateway(settings_for({"fake": upstream}, first_byte_timeout_seconds=30))
    started = time.monotonic()
    status, headers, body = await ask(str(server.make_url("")), stream=False)
    assert status == 502
    assert_gateway_error(headers, body, "upstream_error")
    assert time.monotonic() - started < 10


async def test_an_upstream_redirect_is_not_followed(
    exit_stack: AsyncExitStack, start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A 307 pointing at another server is a failed attempt (502); the other server is never
    contacted, so an upstream cannot steer the gateway (or its credential) elsewhere."""
    elsewhere = await start_simulator("elsewhere")

    async def behaviour(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(elsewhere.url + "/v1/chat/completions")

    upstream = await start_fake_upstream(exit_stack, behaviour)
    server = await start_gateway(settings_for({"fake": upstream}))
    status, headers, body = await ask(str(server.make_url("")), stream=False)
    assert status == 502
    assert_gateway_error(headers, body, "upstream_error")
    assert (await elsewhere.stats()).requests_received == 0


WRONG_SUCCESSES = [
    pytest.param(False, "application/json", b"[1, 2, 3]", id="whole-json-not-an-object"),
    pytest.param(False, "application/json", b"", id="whole-empty"),
    pytest.param(True, "application/json", b'{"object": "chat.completion"}', id="stream-got-json"),
    pytest.param(True, "text/event-stream", b"", id="stream-empty"),
    pytest.param(True, "text/event-stream", b"data: {not json}\n\n", id="stream-first-event-junk"),
]


@pytest.mark.parametrize(("stream", "content_type", "payload"), WRONG_SUCCESSES)
async def test_a_success_that_is_not_what_was_asked_for_is_a_502(
    exit_stack: AsyncExitStack,
    start_gateway: GatewayFactory,
    stream: bool,
    content_type: str,
    payload: bytes,
) -> None:
    """A 200 must be a JSON object (whole) or an event stream with a well-formed first event."""

    async def behaviour(request: web.Request) -> web.StreamResponse:
        return web.Response(body=payload, headers={"Content-Type": content_type})

    upstream = await start_fake_upstream(exit_stack, behaviour)
    server = await start_gateway(settings_for({"fake": upstream}))
    status, headers, body = await ask(str(server.make_url("")), stream=stream)
    assert status == 502
    assert_gateway_error(headers, body, "upstream_error")
    assert b"invalid_response" in body
