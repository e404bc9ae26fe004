"""What the simulator records for tests: requests as received, outcomes, cancellations."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway.simulator import Faults, Timing
from tests.support.polling import wait_until
from tests.support.simulators import InProcessSimulator, NodeStats

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def node() -> AsyncIterator[InProcessSimulator]:
    """One instant node."""
    async with InProcessSimulator("node-s") as simulator:
        yield simulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client."""
    async with aiohttp.ClientSession() as client:
        yield client


async def test_headers_and_body_are_recorded_byte_for_byte(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """The recorded request has the exact body bytes and every header as sent."""
    body = b'{ "model":"m",\n  "messages": [{"role":"user","content":"caf\xc3\xa9"}] }'
    headers = {"Authorization": "Bearer upstream-key", "x-request-id": "req-123"}
    async with session.post(
        f"{node.url}/v1/chat/completions", data=body, headers=headers
    ) as response:
        assert response.status == 200
        node_request_id = response.headers["x-simulator-request-id"]
    record = (await node.stats()).last_request()
    assert record.body == body
    assert record.headers["authorization"] == "Bearer upstream-key"
    assert record.headers["X-Request-Id"] == "req-123"
    assert (record.request_id, record.path, record.outcome, record.status) == (
        node_request_id,
        "/v1/chat/completions",
        "completed",
        200,
    )


async def test_stats_over_http_match_the_in_process_view(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """`GET /sim/stats` parses into the same stats the helper reads directly."""
    async with session.post(f"{node.url}/v1/chat/completions", json=CHAT):
        pass
    async with session.get(f"{node.url}/sim/stats") as response:
        over_http = NodeStats.from_json(await response.json())
    direct = await node.stats()
    assert over_http.recent_requests == direct.recent_requests
    assert (over_http.completed, over_http.prefix_cache_queries) == (1, direct.prefix_cache_queries)


async def test_requests_are_counted_per_path_but_control_calls_are_not(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """Completions, models and metrics are counted by path; `/sim/*` calls are not."""
    for path in ["/v1/models", "/metrics", "/metrics", "/sim/stats", "/sim/faults"]:
        async with session.get(node.url + path):
            pass
    async with session.post(f"{node.url}/v1/completions", json={"model": "m", "prompt": "a"}):
        pass
    stats = await node.stats()
    assert stats.requests_by_path == {"/v1/models": 1, "/metrics": 2, "/v1/completions": 1}
    assert stats.requests_received == 4
    assert len(stats.recent_requests) == 1


async def test_recent_requests_are_a_bounded_ring(session: aiohttp.ClientSession) -> None:
    """Only the last N requests are kept, oldest dropped first."""
    async with InProcessSimulator("ring", recent_requests=3) as node:
        for _ in range(5):
            async with session.post(f"{node.url}/v1/chat/completions", json=CHAT):
                pass
        stats = await node.stats()
    assert [record.request_id for record in stats.recent_requests] == [
        "ring-3",
        "ring-4",
        "ring-5",
    ]


async def test_reset_zeroes_counters_and_forgets_recent_requests(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """After `POST /sim/reset` the counters start again from zero; the cache survives."""
    for _ in range(2):
        async with session.post(f"{node.url}/v1/chat/completions", json=CHAT):
            pass
    async with session.post(f"{node.url}/sim/reset") as response:
        assert response.status == 200
    assert (await node.stats()).requests_received == 0
    async with session.post(f"{node.url}/v1/chat/completions", json=CHAT):
        pass
    stats = await node.stats()
    assert (stats.requests_received, stats.completed, len(stats.recent_requests)) == (1, 1, 1)
    assert stats.prefix_cache_hits == stats.prefix_cache_queries > 0


async def test_reset_can_clear_the_prefix_cache(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """`{"clear_cache": true}` also empties the prefix cache, so the next request misses."""
    async with session.post(f"{node.url}/v1/chat/completions", json=CHAT):
        pass
    async with session.post(f"{node.url}/sim/reset", json={"clear_cache": True}):
        pass
    async with session.post(f"{node.url}/v1/chat/completions", json=CHAT):
        pass
    assert (await node.stats()).prefix_cache_hits == 0


async def test_a_client_leaving_mid_stream_is_recorded_as_cancelled(
    session: aiohttp.ClientSession,
) -> None:
    """Closing the connection after the first chunk cancels the stream and frees its slot."""
    timing = Timing(base_ttft_ms=0.0, per_token_ms=0.0, tokens_per_second=50.0)
    async with InProcessSimulator("n", timing=timing) as node:
        payload = CHAT | {"stream": True, "max_tokens": 1000}
        async with session.post(f"{node.url}/v1/chat/completions", json=payload) as response:
            await response.content.readuntil(b"\n\n")
            left_at = time.monotonic()
            response.close()

        async def cancelled() -> bool:
            stats = await node.stats()
            return (stats.cancelled, stats.in_flight, stats.running) == (1, 0, 0)

        await wait_until(cancelled, message="the stream cancelled and its slot freed")
        stats = await node.stats()
    assert stats.last_cancelled_at is not None
    assert stats.last_cancelled_at >= left_at
    assert stats.last_request().outcome == "cancelled"
    assert stats.last_request().generation_finished_at is None


async def test_a_client_giving_up_before_the_answer_is_recorded_as_cancelled(
    session: aiohttp.ClientSession,
) -> None:
    """A client that abandons a held, non-streamed request cancels its handler."""
    async with InProcessSimulator("n", faults=Faults(hold=True)) as node:
        request = asyncio.create_task(session.post(f"{node.url}/v1/chat/completions", json=CHAT))

        async def in_flight() -> bool:
            return (await node.stats()).in_flight == 1

        await wait_until(in_flight, message="the request held in flight")
        request.cancel()

        async def cancelled() -> bool:
            stats = await node.stats()
            return (stats.cancelled, stats.in_flight, stats.running) == (1, 0, 0)

        await wait_until(cancelled, message="the held request cancelled")
