"""Broken upstreams: each hostile answer becomes a 502/504 (or an SSE error event once a stream
started), a healthy node takes over where there is one, and the worker keeps serving."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from gateway.dispatch.upstream import MAX_SSE_EVENT_BYTES
from gateway.dispatch.whole_relay import MAX_RESPONSE_BYTES
from gateway.edge.error_middleware import error_middleware
from gateway.edge.requestid import REQUEST_IDS, RequestIds
from gateway.simulator import Faults
from gateway.simulator.options import Mode
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.conformance import post_until_broken
from tests.support.gateway import TEST_KEY, TEST_MODEL, build_settings, chat_body
from tests.support.raw_upstream import (
    Exchange,
    RawServer,
    Script,
    answering,
    read_request,
    self_signed,
    server_tls,
)
from tests.support.upstream_corpus import closing_at

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
FIRST_BYTE_TIMEOUT = 0.5
HOSTILE_MODES = [mode for mode in Mode if mode is not Mode.NORMAL]
EXPECTED_STATUS: dict[Mode, int] = {
    mode: 504 if mode is Mode.HANG_AFTER_HEADERS else 502 for mode in HOSTILE_MODES
}
LENGTH_JSON_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 64\r\n\r\n"
    b'{"id":"chatcmpl-2","object":"chat.completion","choices":[]}     '
)
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


# -- issue 21: heads that cannot be relayed, drops after the request, TLS, broken streams


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"


def sse_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


async def raw_upstream(exit_stack: AsyncExitStack, script: Script) -> RawServer:
    """A raw-socket fake upstream running `script` on every connection."""
    return await RawServer(script).start(exit_stack)


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One HTTP/1.1 answer off a kept client connection: its head and its (de-chunked) body."""
    head = await reader.readuntil(b"\r\n\r\n")
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
        return head, body
    length = int(lowered.split(b"content-length:")[1].split(b"\r\n")[0])
    return head, await reader.readexactly(length)


async def two_on_one_connection(url: str, first: bytes, second: bytes) -> list[tuple[bytes, bytes]]:
    """Two chat completions one after the other on one kept client connection (a keep-alive
    client, raw): each answer's head and body."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    answers = []
    try:
        for body in (first, second):
            writer.write(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                b"Authorization: Bearer " + TEST_KEY.encode() + b"\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body)
            )
            answers.append(await asyncio.wait_for(read_answer(reader), 10))
    finally:
        writer.close()
    return answers


def posted(upstream: RawServer) -> list[bytes]:
    """The requests an upstream received, less the load poller's."""
    return [request for request in upstream.requests if request.startswith(b"POST ")]


def chat(stream: bool) -> bytes:
    """A chat completion request body."""
    return orjson.dumps(chat_body(stream=stream, max_tokens=4))


async def test_a_control_byte_in_an_upstream_header_leaves_the_client_connection_in_step(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """A streamed answer with a control byte in a header it relays (D2): the stream reaches the
    client without that header, and the client's next request on the same connection works
    (the gateway's 500 used to declare a length and be sent chunked, desyncing the client)."""
    answer = SSE_HEAD + b"x-request-id: up\x01stream\r\n\r\n" + sse_chunk(FIRST_EVENT)
    answer += sse_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
    upstream = await raw_upstream(exit_stack, answering(answer, LENGTH_JSON_ANSWER))
    server = await start_gateway(settings_for({"raw": upstream.url}))
    (head, body), (second_head, second_body) = await two_on_one_connection(
        str(server.make_url("")), chat(stream=True), chat(stream=False)
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert b"x-upstream-request-id" not in head.lower()
    assert body == FIRST_EVENT + b"data: [DONE]\n\n"
    assert second_head.startswith(b"HTTP/1.1 200")
    assert orjson.loads(second_body)["object"] == "chat.completion"


async def test_an_error_after_a_streamed_head_was_prepared_is_framed_as_sent(
    exit_stack: AsyncExitStack,
) -> None:
    """A handler whose streamed response fails in `prepare` (a head aiohttp refuses to write):
    the gateway's 500 is sent chunked and says so, and the next request on the connection is
    answered (D2)."""

    async def failing(request: web.Request) -> web.StreamResponse:
        if request.headers.get("x-fail"):
            response = web.StreamResponse(headers={"x-bad": "a\x01b"})
            response.enable_chunked_encoding()
            await response.prepare(request)
        return web.json_response({"object": "chat.completion"})

    app = web.Application(middlewares=[error_middleware])
    app[REQUEST_IDS] = RequestIds()
    app.router.add_post("/v1/chat/completions", failing)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    exit_stack.push_async_callback(server.close)
    host, port = server.host, server.port
    reader, writer = await asyncio.open_connection(host, port)
    exit_stack.callback(writer.close)
    answers = []
    for extra in (b"x-fail: 1\r\n", b""):
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: h\r\n%sContent-Length: 0\r\n\r\n" % extra
        )
        answers.append(await asyncio.wait_for(read_answer(reader), 10))
    (head, body), (second_head, second_body) = answers
    assert head.startswith(b"HTTP/1.1 500")
    assert b"content-length" not in head.lower()
    assert orjson.loads(body)["error"]["code"] == "internal_error"
    assert second_head.startswith(b"HTTP/1.1 200")
    assert orjson.loads(second_body)["object"] == "chat.completion"


async def test_a_broken_stream_is_an_aborted_transfer_and_the_clients_next_request_is_served(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """An upstream that drops mid-stream (D6, and issue 22's direct baseline): the client reads
    the error line, then a transfer aborted without its chunked end, so a keep-alive client
    knows not to reuse that connection; its next request through the same session is answered
    (the gateway used to end the response as if complete and then close the connection)."""

    async def dropping(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        while True:
            request = await read_request(reader, exchange)
            if b'"stream":true' in request:
                writer.write(SSE_HEAD + b"\r\n" + sse_chunk(FIRST_EVENT))
                await writer.drain()
                return  # dropped mid-stream
            writer.write(LENGTH_JSON_ANSWER)
            await writer.drain()

    upstream = await raw_upstream(exit_stack, dropping)
    server = await start_gateway(settings_for({"raw": upstream.url}))
    url = str(server.make_url("/v1/chat/completions"))
    received: list[bytes] = []

    async def read_stream(session: aiohttp.ClientSession) -> None:
        async with session.post(url, data=chat(stream=True), headers=AUTH) as response:
            assert response.status == 200
            async for chunk in response.content.iter_any():
                received.append(chunk)

    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_stream(session)
        assert b'"upstream_dropped"' in b"".join(received)
        async with session.post(url, data=chat(stream=False), headers=AUTH) as response:
            assert response.status == 200
            assert (await response.json())["object"] == "chat.completion"


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "malformed_answer",
            id="malformed-head",
        ),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "malformed_answer", id="status-101"
        ),
        pytest.param(
            b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\n{}", "malformed_answer", id="status-099"
        ),
        pytest.param(
            b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\n{}", "malformed_answer", id="status-600"
        ),
        pytest.param(
            b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\n{}", "malformed_answer", id="status-999"
        ),
        pytest.param(b"", "dropped_after_send", id="closed-after-the-request"),
        pytest.param(b"RESET", "dropped_after_send", id="reset-after-the-request"),
    ],
)
async def test_an_answer_that_may_have_run_is_a_502_without_retry_after(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, answer: bytes, outcome: str
) -> None:
    """A head that cannot be relayed (malformed, 101, a status outside 100-599) or a close or
    reset after the request went out (D3, D4): 502 `upstream_error` naming what happened, with no
    Retry-After (the request may have run); never 503 'could not be reached', never the odd
    status relayed."""
    reset = answer == b"RESET"
    upstream = await raw_upstream(exit_stack, closing_at(b"" if reset else answer, by_reset=reset))
    server = await start_gateway(settings_for({"raw": upstream.url}))
    status, headers, body = await ask(str(server.make_url("")), stream=False)
    assert status == 502
    assert "Retry-After" not in headers
    assert_gateway_error(headers, body, "upstream_error")
    assert f"raw: {outcome}".encode() in body
    assert len(posted(upstream)) == 1  # a POST is never sent twice


async def test_an_untrusted_tls_upstream_is_a_tls_failure_logged_with_its_reason(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """An https provider whose certificate is not trusted (D3): 502 `upstream_tls_failed` with
    no Retry-After, and the log says why TLS failed; nothing was sent."""
    cert, key = self_signed(tmp_path)
    upstream = await RawServer(answering(LENGTH_JSON_ANSWER), tls=server_tls(cert, key)).start(
        exit_stack
    )
    server = await start_gateway(settings_for({"tls": upstream.url}))
    with capture_logs() as logs:
        status, headers, body = await ask(str(server.make_url("")), stream=False)
    assert status == 502
    assert "Retry-After" not in headers
    assert_gateway_error(headers, body, "upstream_tls_failed")
    failures = [entry for entry in logs if entry["event"] == "upstream_tls_failed"]
    assert failures
    assert "certificate verify failed" in failures[0]["reason"]
    assert failures[0]["provider"] == "tls"
    assert not posted(upstream)
