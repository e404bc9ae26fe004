"""Usage accounting on the request path: tokens read from answers and streams, the usage event
asked for and taken out when the client did not ask, and the outcome of each request."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from affinity_store.postgres import create_pool
from affinity_store.usage import MemoryUsageStore, PostgresUsageStore, Tokens, UsageKey, UsageStore
from gateway.app import create_app
from gateway.config import Settings
from gateway.simulator import Timing
from tests.conftest import SimulatorFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, build_settings, chat_body
from tests.support.polling import wait_until
from tests.support.simulators import InProcessSimulator

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
ADMIN_TOKEN = "admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
INCLUDE_USAGE = b'{"stream_options":{"include_usage":true},'
CREATED = re.compile(rb'"created":\d+')
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

UsageGateway = Callable[..., Awaitable[tuple[TestServer, Any]]]


@pytest.fixture
def usage_gateway(exit_stack: AsyncExitStack) -> UsageGateway:
    """A gateway whose usage rollups go to an in-memory store, flushed every 50 ms."""

    async def start(
        node: InProcessSimulator, store: UsageStore | None = None, **provider: Any
    ) -> tuple[TestServer, UsageStore]:
        settings = usage_settings(node, **provider)
        store = store or MemoryUsageStore()
        app = create_app(settings, usage_store=store)
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        exit_stack.push_async_callback(server.close)
        return server, store

    return start


def usage_settings(node: InProcessSimulator, *, usage: bool = True, **provider: Any) -> Settings:
    """One provider (no model renaming, so answers pass byte for byte), fast usage flushes."""
    settings = build_settings(
        {node.name: node.url},
        upstream_model=TEST_MODEL,
        extra={
            "usage": {"enabled": usage, "flush_interval_seconds": 0.05},
            "server": {"admin_token": ADMIN_TOKEN},
        },
    )
    if provider:
        (settings_provider,) = settings.providers
        updated = settings_provider.model_copy(update=provider)
        settings = settings.model_copy(update={"providers": [updated]})
    return settings


async def recorded(store: MemoryUsageStore, outcome: str = "ok", requests: int = 1) -> Tokens:
    """The team-a key's counts for TEST_MODEL with `outcome`, once flushes wrote `requests`."""
    key = UsageKey("team-a", TEST_MODEL, "node-a", outcome)

    async def flushed() -> bool:
        totals = await store.usage_totals(EPOCH, timeout=1)
        return key in totals and totals[key].requests >= requests

    await wait_until(flushed, timeout=5, message=f"{requests} {outcome} request(s) recorded")
    return (await store.usage_totals(EPOCH, timeout=1))[key]


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> bytes:
    """POST a JSON body; the answer's bytes (asserting a 200)."""
    async with session.post(url, data=orjson.dumps(body), headers=AUTH) as response:
        assert response.status == 200, await response.text()
        return await response.read()


async def test_a_stream_the_client_did_not_ask_usage_of_is_byte_identical_and_counted(
    start_simulator: SimulatorFactory, usage_gateway: UsageGateway
) -> None:
    """The gateway asks the node for usage and takes the usage event out: the client's bytes are
    the bytes the same request gets straight from a twin node, and the tokens are recorded."""
    direct = await start_simulator("node-a")
    behind = await start_simulator("node-a")
    server, store = await usage_gateway(behind)
    body = chat_body("byte for byte", stream=True, max_tokens=5, model=TEST_MODEL)
    async with aiohttp.ClientSession() as session:
        straight = await post(session, f"{direct.url}/v1/chat/completions", body)
        through = await post(session, str(server.make_url("/v1/chat/completions")), body)
    # Only `created` (the second each node answered in) may differ between the two nodes.
    (created,) = set(CREATED.findall(through))
    assert through == CREATED.sub(created, straight)
    assert b'"usage"' not in through
    assert through.endswith(b"data: [DONE]\n\n")
    upstream = (await behind.stats()).last_request()
    assert upstream.body == INCLUDE_USAGE + orjson.dumps(body)[1:]
    tokens = await recorded(store)
    assert tokens == Tokens(1, upstream.prompt_tokens or 0, 5, upstream.cached_tokens or 0)
    assert tokens.prompt_tokens > 0


async def test_a_client_that_asked_for_usage_gets_the_usage_event(
    start_simulator: SimulatorFactory, usage_gateway: UsageGateway
) -> None:
    """With `include_usage` the client's body goes up unchanged and the usage chunk comes back;
    the gateway records the same tokens."""
    node = await start_simulator("node-a")
    server, store = await usage_gateway(node)
    async with openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=TEST_KEY) as sdk:
        stream = await sdk.chat.completions.create(
            model=TEST_MODEL,
            messages=[{"role": "user", "content": "count me"}],
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert b"stream_options" in (await node.stats()).last_request().body
    assert (await node.stats()).last_request().body.count(b"stream_options") == 1
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    assert await recorded(store) == Tokens(
        1, usage.prompt_tokens, usage.completion_tokens, cached or 0
    )


async def test_a_whole_answer_s_usage_is_recorded(
    start_simulator: SimulatorFactory, usage_gateway: UsageGateway
) -> None:
    """A non-streamed answer's `usage` is recorded as it was answered, and counted per key id."""
    node = await start_simulator("node-a")
    server, store = await usage_gateway(node)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the second one finds its prompt in the node's cache
            answer = orjson.loads(
                await post(
                    session,
                    str(server.make_url("/v1/chat/completions")),
                    chat_body("a whole answer", max_tokens=3, model=TEST_MODEL),
                )
            )
        scrape = await (await session.get(str(server.make_url("/metrics")))).text()
    usage = answer["usage"]
    total = await recorded(store, requests=2)
    assert total.requests == 2
    assert total.completion_tokens == 2 * usage["completion_tokens"]
    assert total.cached_tokens == usage["prompt_tokens_details"]["cached_tokens"] > 0
    assert (
        'gateway_tokens_total{key="team-a",kind="completion",model="test-model",provider="node-a"}'
        f" {2 * usage['completion_tokens']}.0"
    ) in scrape
    assert TEST_KEY not in scrape


async def test_stream_usage_false_sends_the_client_s_body_and_counts_the_request(
    start_simulator: SimulatorFactory, usage_gateway: UsageGateway
) -> None:
    """`providers[].stream_usage: false`: the body goes up unchanged; the request still counts."""
    node = await start_simulator("node-a")
    server, store = await usage_gateway(node, stream_usage=False)
    body = chat_body("as sent", stream=True, max_tokens=2, model=TEST_MODEL)
    async with aiohttp.ClientSession() as session:
        await post(session, str(server.make_url("/v1/chat/completions")), body)
    assert (await node.stats()).last_request().body == orjson.dumps(body)
    assert await recorded(store) == Tokens(1)


async def test_usage_disabled_leaves_streams_alone(
    start_simulator: SimulatorFactory, usage_gateway: UsageGateway
) -> None:
    """`usage.enabled: false`: nothing asked of the node, nothing recorded."""
    node = await start_simulator("node-a")
    server, store = await usage_gateway(node, usage=False)
    body = chat_body("left alone", stream=True, max_tokens=2, model=TEST_MODEL)
    async with aiohttp.ClientSession() as session:
        await post(session, str(server.make_url("/v1/chat/completions")), body)
    assert (await node.stats()).last_request().body == orjson.dumps(body)
    assert store.adds == 0


async def test_a_stream_the_client_cut_counts_as_cancelled(
    start_simulator: SimulatorFactory, usage_gateway: UsageGateway
) -> None:
    """A client that goes away mid-stream: the request is recorded with outcome `cancelled`."""
    node = await start_simulator("node-a", timing=Timing(base_ttft_ms=0, tokens_per_second=20))
    server, store = await usage_gateway(node)
    body = chat_body("cut short", stream=True, max_tokens=200, model=TEST_MODEL)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            str(server.make_url("/v1/chat/completions")), data=orjson.dumps(body), headers=AUTH
        ) as response,
    ):
        assert response.status == 200
        await response.content.readuntil(b"\n\n")
        response.close()
    assert (await recorded(store, "cancelled")).requests == 1


async def test_admin_usage_lists_the_rollups_with_the_cli_s_filters(
    start_simulator: SimulatorFactory, usage_gateway: UsageGateway
) -> None:
    """`/admin/usage` needs the admin token, groups by `by` since `since`, and refuses bad
    filters with an OpenAI-shaped 400."""
    node = await start_simulator("node-a")
    server, store = await usage_gateway(node)
    async with aiohttp.ClientSession() as session:
        answer = orjson.loads(
            await post(
                session,
                str(server.make_url("/v1/chat/completions")),
                chat_body("admin view", max_tokens=3, model=TEST_MODEL),
            )
        )
        await recorded(store)
        url = str(server.make_url("/admin/usage"))
        async with session.get(url) as refused:
            assert refused.status == 401
        async with session.get(
            url, params={"since": "1h", "by": "key,provider"}, headers=ADMIN
        ) as ok:
            rows = await ok.json()
        async with session.get(url, params={"since": "soon"}, headers=ADMIN) as bad:
            error = (await bad.json())["error"]
    assert rows == [
        {
            "key": "team-a",
            "provider": "node-a",
            "requests": 1,
            "prompt_tokens": answer["usage"]["prompt_tokens"],
            "completion_tokens": 3,
            "cached_tokens": 0,
        }
    ]
    assert bad.status == 400
    assert error["param"] == "since"


async def test_the_status_page_shows_the_last_hour_per_key_and_a_chart(
    start_simulator: SimulatorFactory, usage_gateway: UsageGateway
) -> None:
    """The status page lists each key's requests, tokens and cached share, with an inline SVG
    chart and no script."""
    node = await start_simulator("node-a")
    server, store = await usage_gateway(node)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            await post(
                session,
                str(server.make_url("/v1/chat/completions")),
                chat_body("status usage", max_tokens=2, model=TEST_MODEL),
            )
        await recorded(store, requests=2)
        async with session.get(str(server.make_url("/admin/status")), headers=ADMIN) as page:
            html = await page.text()
    row = re.search(r'<tr data-usage-key="team-a">(.*?)</tr>', html)
    assert row is not None
    cells = re.findall(r'<td class="number">([^<]*)</td>', row[1])
    assert cells[0] == "2"
    assert cells[2] == "4"
    assert cells[3].endswith("%")
    assert '<svg id="usage-chart"' in html
    assert "<rect" in html
    assert "<script" not in html
    assert TEST_KEY not in html


async def test_the_status_page_renders_when_the_usage_store_does_not_answer(
    start_simulator: SimulatorFactory, usage_gateway: UsageGateway
) -> None:
    """A usage store that accepts connections and never answers: the page comes back within
    its bound saying so, and `/admin/usage` answers 503."""
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    pool = await create_pool(
        f"postgresql://nobody@127.0.0.1:{port}/none",
        min_size=0,
        max_size=1,
        statement_cache_size=0,
        connect_eagerly=False,
    )
    node = await start_simulator("node-a")
    server, _ = await usage_gateway(node, PostgresUsageStore(pool))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(str(server.make_url("/admin/status")), headers=ADMIN) as page:
                html = await page.text()
                assert page.status == 200
            async with session.get(str(server.make_url("/admin/usage")), headers=ADMIN) as usage:
                assert usage.status == 503
    finally:
        silent.close()
        await pool.close()
    assert 'id="usage"' in html
    assert "store down" in html
