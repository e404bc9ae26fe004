"""A real worker behind a hostile node: the right error every time, serving goes on, and the
worker's memory stays bounded however the node misbehaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import orjson
import psutil
import pytest

from bench.launcher import GatewayProcess
from gateway.dispatch.whole_relay import MAX_RESPONSE_BYTES
from gateway.simulator.options import Mode
from tests.support.gateway import TEST_KEY, TEST_MODEL, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.raw_upstream import Exchange, RawServer, read_request
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

FIRST_BYTE_TIMEOUT = 0.5
ROUNDS = 3
CONCURRENCY = 8  # half streamed, half whole
WARM_UP_REQUESTS = 50
HOSTILE_MODES = [mode for mode in Mode if mode is not Mode.NORMAL]
# An endless body is refused as oversized, or as too slow when 32 MiB take longer than the
# (short) deadline on a busy machine; silence is a timeout; everything else is unusable.
EXPECTED_STATUSES = {Mode.ENDLESS_BODY: {502, 504}, Mode.HANG_AFTER_HEADERS: {504}}
# A whole answer may be buffered up to MAX_RESPONSE_BYTES before it is refused. The growth
# allowed is one round's worth of such buffers (what the allocator may keep); a leak of one
# buffer per request would pass it within the three rounds.
RSS_GROWTH_LIMIT = (CONCURRENCY // 2) * MAX_RESPONSE_BYTES


@pytest.fixture
async def node() -> AsyncIterator[SimulatorProcess]:
    """A simulator process, healthy until a test turns it hostile."""
    async with SimulatorProcess("node-a", ["--base-ttft-ms", "0"]) as simulator:
        yield simulator


@pytest.fixture
async def gateway(
    node: SimulatorProcess, database_url: str, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """A single-worker gateway in front of `node`, with 0.5 s first-byte and response timeouts."""
    config = settings_dict(
        {"node-a": node.url},
        extra={
            "database": {"url": database_url},
            # Never cooling the node, so every request meets the hostile answer.
            "routing": {
                "first_byte_timeout_seconds": FIRST_BYTE_TIMEOUT,
                "response_timeout_seconds": FIRST_BYTE_TIMEOUT,
                "allowed_fails": 10_000,
            },
            "models": [{"name": TEST_MODEL, "stickiness": "none"}],
        },
    )
    process = GatewayProcess(config, tmp_path)
    process.start()
    try:
        async with aiohttp.ClientSession() as session:

            async def answers() -> bool:
                try:
                    async with session.get(process.url + "/healthz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(answers, timeout=30, interval=0.05, message="the gateway to answer")
        yield process
    finally:
        process.stop()


async def ask(session: aiohttp.ClientSession, url: str, *, stream: bool) -> tuple[int, bytes]:
    """One chat completion; its status and whole body."""
    async with session.post(
        url + "/v1/chat/completions",
        data=orjson.dumps(chat_body(stream=stream, max_tokens=4)),
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    ) as response:
        assert "x-gateway-provider" not in response.headers or response.status == 200
        return response.status, await response.read()


@pytest.mark.parametrize("mode", HOSTILE_MODES, ids=[mode.value for mode in HOSTILE_MODES])
async def test_a_hostile_node_gets_502_or_504_every_time_and_the_worker_stays_bounded(
    node: SimulatorProcess, gateway: GatewayProcess, mode: Mode
) -> None:
    """Rounds of concurrent requests, streamed and whole, all answered with the gateway's own
    502 or 504 in bounded time; afterwards the worker serves and its RSS grew less than
    RSS_GROWTH_LIMIT."""
    assert gateway.process is not None
    worker = psutil.Process(gateway.process.pid)
    expected = EXPECTED_STATUSES.get(mode, {502})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _ in range(WARM_UP_REQUESTS):
            assert (await ask(session, gateway.url, stream=False))[0] == 200
        rss_before = worker.memory_info().rss
        await node.set_faults(mode=mode.value)
        peak = rss_before
        for _ in range(ROUNDS):
            answers = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        ask(session, gateway.url, stream=index % 2 == 0)
                        for index in range(CONCURRENCY)
                    )
                ),
                timeout=30,
            )
            for status, body in answers:
                assert status in expected, body[:300]
                assert orjson.loads(body)["error"]["code"] in {"upstream_error", "upstream_timeout"}
            peak = max(peak, worker.memory_info().rss)
        await node.set_faults(mode="normal")
        assert (await ask(session, gateway.url, stream=True))[0] == 200
        rss_after = worker.memory_info().rss
    print(
        f"{mode.value}: worker RSS {rss_before / 2**20:.1f} -> peak {peak / 2**20:.1f}"
        f" -> {rss_after / 2**20:.1f} MiB"
    )
    assert rss_after - rss_before < RSS_GROWTH_LIMIT


CHAT_ANSWER = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'
KEEP_ALIVE_REQUESTS = 200
KEEP_ALIVE_CONCURRENCY = 20


async def test_an_upstream_closing_after_every_answer_without_saying_so_fails_no_request(
    database_url: str, tmp_path: Path, exit_stack: AsyncExitStack
) -> None:
    """A real worker in front of an upstream that closes every connection after its answer,
    without `Connection: close` (issue 21, D1), 20 clients at once: every request succeeds, and
    each reaches the upstream exactly once (the worker used to reuse connections whose close was
    on its way: about half failed)."""

    async def close_after_answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        await read_request(reader, exchange)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(CHAT_ANSWER), CHAT_ANSWER)
        )
        await writer.drain()

    upstream = await RawServer(close_after_answer).start(exit_stack)
    config = settings_dict(
        {"raw": upstream.url},
        extra={
            "database": {"url": database_url},
            "routing": {"allowed_fails": 10_000},
            "models": [{"name": TEST_MODEL, "stickiness": "none"}],
        },
    )
    process = GatewayProcess(config, tmp_path)
    process.start()
    exit_stack.callback(process.stop)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def answers() -> bool:
            try:
                async with session.get(process.url + "/healthz") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(answers, timeout=30, interval=0.05, message="the gateway to answer")
        posted_before = len(posted(upstream))
        queue = iter(range(KEEP_ALIVE_REQUESTS))

        async def client() -> list[int]:
            return [(await ask(session, process.url, stream=False))[0] for _ in queue]

        statuses = await asyncio.wait_for(
            asyncio.gather(*(client() for _ in range(KEEP_ALIVE_CONCURRENCY))), timeout=60
        )
    flat = [status for statuses_of_one in statuses for status in statuses_of_one]
    assert flat == [200] * KEEP_ALIVE_REQUESTS
    assert len(posted(upstream)) - posted_before == KEEP_ALIVE_REQUESTS


def posted(upstream: RawServer) -> list[bytes]:
    """The chat completions an upstream received (not the load poller's requests)."""
    return [request for request in upstream.requests if request.startswith(b"POST ")]
