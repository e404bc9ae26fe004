"""Issue 20, no amplification: failover within a retry budget, no third provider once the request
is the common factor, `x-should-retry: false` once every candidate was tried, and no Retry-After
the upstream did not send."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from bench.launcher import free_port
from gateway.config import Settings
from gateway.operations.app_keys import METRICS
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, UPSTREAM_MODEL, chat_body, settings_dict
from tests.support.polling import wait_until

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
NOT_STICKY = {"name": TEST_MODEL, "stickiness": "none"}
POISON = "POISON-20-b7d1"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def completion() -> web.Response:
    """A minimal non-streamed chat completion."""
    return web.json_response(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": UPSTREAM_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
        }
    )


def server_error() -> web.Response:
    """An OpenAI-shaped 500 without Retry-After."""
    body = {"error": {"message": "Boom.", "type": "server_error", "code": None}}
    return web.json_response(body, status=500)


class SecondChance:
    """Upstreams that fail each request's first attempt with 500 and answer its second: every
    request fails over once. Attempts wait for their gate, so the test decides when each
    kind is answered; the gateway's `x-request-id` tells one request's attempts apart."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.first_gate = asyncio.Event()
        self.second_gate = asyncio.Event()

    def count(self, attempt: int) -> int:
        """Requests whose `attempt`th attempt (1 or 2) has arrived."""
        return sum(1 for seen in self.seen.values() if seen >= attempt)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Hold, then 500 for a request's first attempt and 200 for its second."""
        request_id = request.headers["x-request-id"]
        self.seen[request_id] += 1
        if self.seen[request_id] == 1:
            await self.first_gate.wait()
            return server_error()
        await self.second_gate.wait()
        return completion()


async def upstream(stack: AsyncExitStack, handler: Handler) -> str:
    """A real HTTP server answering chat completions with `handler`; its root URL."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    stack.push_async_callback(server.close)
    return str(server.make_url("")).rstrip("/")


def gateway_settings(upstreams: dict[str, str], **routing: Any) -> Settings:
    """A gateway before these upstreams, the model not sticky, with routing settings merged."""
    config = settings_dict(upstreams, extra={"models": [NOT_STICKY], "routing": routing})
    return Settings.model_validate(config)


async def post(
    session: aiohttp.ClientSession, server: TestServer, content: str = "hello"
) -> tuple[int, CIMultiDict[str], bytes]:
    """One chat completion; its status, headers and body."""
    body = chat_body(max_tokens=2) | {"messages": [{"role": "user", "content": content}]}
    async with session.post(
        server.make_url("/v1/chat/completions"), data=orjson.dumps(body), headers=AUTH
    ) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


def counter(server: TestServer, name: str, labels: dict[str, str] | None = None) -> float:
    """A counter's value in the gateway's registry (0 when never counted)."""
    value = server.app[METRICS].registry.get_sample_value(name, labels or {})
    return value or 0.0


@pytest.mark.parametrize(("in_flight", "allowed"), [(40, 8), (10, 3)], ids=["20-percent", "floor"])
async def test_concurrent_failovers_are_capped_by_the_retry_budget(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, in_flight: int, allowed: int
) -> None:
    """Every one of N requests in flight fails its first attempt at once: retries are admitted
    up to max(3, 20 % of N), the rest answer their provider's 500 at once (no Retry-After, no
    `x-should-retry`: a provider was left), and the admitted retries are served."""
    gates = SecondChance()
    urls = {name: await upstream(exit_stack, gates.handle) for name in ("node-a", "node-b")}
    server = await start_gateway(gateway_settings(urls))
    async with aiohttp.ClientSession() as session:
        with structlog.testing.capture_logs() as logs:
            requests = [asyncio.create_task(post(session, server)) for _ in range(in_flight)]
            await wait_until(
                lambda: gates.count(1) == in_flight, message="every first attempt in flight"
            )
            gates.first_gate.set()
            await wait_until(
                lambda: sum(task.done() for task in requests) + gates.count(2) == in_flight,
                message="each request retried or answered",
            )
            # Nothing more moves until the retries are answered.
            refused = [task for task in requests if task.done()]
            retried = gates.count(2)
            gates.second_gate.set()
            outcomes = await asyncio.gather(*requests)
    assert retried == allowed
    statuses = Counter(status for status, _, _ in outcomes)
    assert statuses == {200: allowed, 500: in_flight - allowed}
    for task in refused:
        status, headers, body = task.result()
        assert status == 500
        assert orjson.loads(body)["error"]["message"].startswith("Boom.")
        assert "Retry-After" not in headers
        assert "x-should-retry" not in headers
    assert counter(server, "gateway_retries_total") == allowed
    assert counter(server, "gateway_retries_refused_total", {"reason": "budget"}) == (
        in_flight - allowed
    )
    stopped = [entry for entry in logs if entry.get("failover_stopped") == "budget"]
    assert len(stopped) == in_flight - allowed


async def test_a_retry_stream_stops_holding_the_budget_once_it_answers(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """A budget of one retry: a retry whose stream has begun (and is still streaming) leaves
    room for the next request's retry."""
    seen: Counter[str] = Counter()
    finish = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        request_id = request.headers["x-request-id"]
        seen[request_id] += 1
        if seen[request_id] == 1:
            return server_error()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"id": "c", "object": "chat.completion.chunk", "model": UPSTREAM_MODEL}
        await response.write(b"data: " + orjson.dumps(chunk | {"choices": []}) + b"\n\n")
        await finish.wait()
        await response.write(b"data: [DONE]\n\n")
        return response

    urls = {name: await upstream(exit_stack, handle) for name in ("node-a", "node-b")}
    server = await start_gateway(
        gateway_settings(urls, retry_budget_percent=0, retry_budget_min_concurrent=1)
    )
    body = orjson.dumps(chat_body(stream=True, max_tokens=2))
    async with aiohttp.ClientSession() as session:
        streams = []
        for _ in range(2):
            response = await session.post(
                server.make_url("/v1/chat/completions"), data=body, headers=AUTH
            )
            assert response.status == 200
            assert (await response.content.readline()).startswith(b"data: ")
            streams.append(response)
        finish.set()
        for response in streams:
            assert (await response.read()).rstrip().endswith(b"[DONE]")
            response.release()
    assert sorted(seen.values()) == [2, 2]
    assert counter(server, "gateway_retries_total") == 2
    assert counter(server, "gateway_retries_refused_total", {"reason": "budget"}) == 0


async def test_a_request_two_providers_fail_alike_tries_no_third(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Three nodes that all 500 on one request's content: it stops after the second provider,
    and the client is told not to resend (`x-should-retry: false`, no Retry-After)."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b", "node-c")]
    for node in nodes:
        await node.set_faults(error_on_text=POISON)
    server = await start_gateway(gateway_settings({node.name: node.url for node in nodes}))
    async with aiohttp.ClientSession() as session:
        with structlog.testing.capture_logs() as logs:
            status, headers, _ = await post(session, server, f"say {POISON}")
        assert (await post(session, server))[0] == 200
    assert status == 500
    assert headers["x-should-retry"] == "false"
    assert "Retry-After" not in headers
    tried = [(await node.stats()).completion_requests for node in nodes]
    assert sum(tried) == 3  # two for the poisoned request, one for the next
    assert counter(server, "gateway_retries_total") == 1
    assert counter(server, "gateway_retries_refused_total", {"reason": "request_suspected"}) == 1
    line = next(entry for entry in logs if entry["event"] == "request")
    assert line["failover_stopped"] == "request_suspected"
    assert len(line["attempts"]) == 2


async def test_provider_faults_are_not_the_requests_and_fail_over_to_the_third(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """A 500 and a 503 (a provider's state, not the request's doing) do not make the request
    the suspect: the third provider is tried and serves it."""
    tried: dict[str, list[str]] = {}

    def handler(name: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            tried.setdefault(request.headers["x-request-id"], []).append(name)
            if name == "node-a":
                return server_error()
            if name == "node-b":
                return web.json_response({"error": {"message": "Warming up."}}, status=503)
            return completion()

        return handle

    names = ("node-a", "node-b", "node-c")
    urls = {name: await upstream(exit_stack, handler(name)) for name in names}
    server = await start_gateway(gateway_settings(urls))
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert (await post(session, server))[0] == 200
    assert all(nodes[-1] == "node-c" for nodes in tried.values()), tried
    # The least recently started provider goes first: some request met both failures first.
    assert any(len(nodes) == 3 for nodes in tried.values()), tried


async def test_rate_limits_everywhere_leave_the_client_free_to_resend(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """Every provider answers 429 with Retry-After: the client gets their soonest wait and no
    `x-should-retry` (the providers cool for as long as they asked, so a resend costs them
    nothing); without an upstream Retry-After, none is invented."""

    def limited(wait: str | None) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            headers = {"Retry-After": wait} if wait is not None else {}
            body = {"error": {"message": "Slow down.", "type": "rate_limit_error"}}
            return web.json_response(body, status=429, headers=headers)

        return handle

    waits = {"node-a": "7", "node-b": "4"}
    urls = {name: await upstream(exit_stack, limited(wait)) for name, wait in waits.items()}
    server = await start_gateway(gateway_settings(urls))
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, server)
    assert (status, headers["Retry-After"]) == (429, "4")
    assert "x-should-retry" not in headers

    silent = await upstream(exit_stack, limited(None))
    server = await start_gateway(gateway_settings({"node-a": silent}))
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, server)
    assert status == 429
    assert "Retry-After" not in headers
    assert "x-should-retry" not in headers


async def test_no_provider_reachable_is_the_gateways_own_503_with_its_retry_after(
    start_gateway: GatewayFactory,
) -> None:
    """Refused connections everywhere: 503 with the gateway's own `Retry-After: 1` and no
    `x-should-retry` (nothing reached an upstream; a resend later may find one back)."""
    dead = {name: f"http://127.0.0.1:{free_port()}" for name in ("node-a", "node-b")}
    server = await start_gateway(gateway_settings(dead))
    async with aiohttp.ClientSession() as session:
        status, headers, body = await post(session, server)
    assert (status, headers["Retry-After"]) == (503, "1")
    assert orjson.loads(body)["error"]["code"] == "upstream_unreachable"
    assert "x-should-retry" not in headers


async def test_an_upstream_that_says_when_to_come_back_is_not_contradicted(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """The only provider answers 503 with `Retry-After: 12`: the client gets it as sent and no
    `x-should-retry: false` (which would stop an SDK from honouring it)."""

    async def warming(request: web.Request) -> web.StreamResponse:
        body = {"error": {"message": "Warming up.", "type": "server_error"}}
        return web.json_response(body, status=503, headers={"Retry-After": "12"})

    server = await start_gateway(gateway_settings({"node-a": await upstream(exit_stack, warming)}))
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, server)
    assert (status, headers["Retry-After"]) == (503, "12")
    assert "x-should-retry" not in headers
