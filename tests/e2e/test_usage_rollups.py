"""Usage rollups from real `gateway serve` processes: 2 replicas x 2 workers add up in one
Postgres to what the node counted, a SIGKILLed worker loses at most one flush interval, and the
janitor deletes expired minutes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from bench import launcher
from bench.launcher import GatewayProcess
from tests.support.gateway import TEST_KEY, TEST_MODEL, answers, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:prefix_cache_hits")
TOTALS = (
    "SELECT coalesce(sum(requests), 0)::bigint AS requests,"
    " coalesce(sum(prompt_tokens), 0)::bigint AS prompt,"
    " coalesce(sum(completion_tokens), 0)::bigint AS completion,"
    " coalesce(sum(cached_tokens), 0)::bigint AS cached"
    " FROM usage_rollups WHERE minute > now() - interval '1 day'"
)


@asynccontextmanager
async def gateways(
    database_url: str, tmp_path: Path, *, replicas: int, usage: dict[str, Any]
) -> AsyncIterator[tuple[SimulatorProcess, list[GatewayProcess], asyncpg.Connection]]:
    """A simulator and `replicas` 2-worker gateways on one Postgres, all answering."""
    async with AsyncExitStack() as stack:
        node = await stack.enter_async_context(SimulatorProcess("node-a"))
        config = settings_dict({"node-a": node.url}, upstream_model=TEST_MODEL)
        config["database"] = {"url": database_url, "pool_min_size": 1, "pool_max_size": 4}
        config["usage"] = usage
        started = await stack.enter_async_context(
            launcher.gateways(tmp_path, [config] * replicas, workers=2)
        )
        connection = await asyncpg.connect(database_url)
        stack.push_async_callback(connection.close)
        yield node, started, connection


async def rollup_totals(db: asyncpg.Connection) -> asyncpg.Record:
    """The rollups' requests and tokens of the last day, summed."""
    row = await db.fetchrow(TOTALS)
    assert row is not None
    return row


async def node_counters(node: SimulatorProcess) -> dict[str, float]:
    """The node's token counters, as vLLM names them."""
    async with aiohttp.ClientSession() as session, session.get(f"{node.url}/metrics") as response:
        text = await response.text()
    values = {}
    for name in COUNTERS:
        match = re.search(rf"^{re.escape(name)}(?:_total)?\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
        assert match is not None, name
        values[name] = float(match[1])
    return values


def request_of(index: int) -> tuple[str, dict[str, Any]]:
    """The `index`-th request of a mixed run: streamed with and without `include_usage`, whole,
    chat and legacy; a few conversations repeat so the node serves some prompts from cache."""
    content = f"conversation {index % 5} about usage"
    kind = index % 4
    if kind == 3:
        return "/v1/completions", {"model": TEST_MODEL, "prompt": content, "max_tokens": 3}
    body: dict[str, Any] = {
        "model": TEST_MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2 + index % 3,
    }
    if kind in (1, 2):
        body["stream"] = True
    if kind == 2:
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", body


async def send(urls: list[str], indexes: range) -> None:
    """One request per index, each on a new connection (so the workers share them)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(index: int) -> None:
            path, body = request_of(index)
            url = urls[index % len(urls)] + path
            async with session.post(url, data=orjson.dumps(body), headers=AUTH) as response:
                assert response.status == 200, await response.text()
                await response.read()

        for start in range(indexes.start, indexes.stop, 8):
            await asyncio.gather(
                *(one(index) for index in range(start, min(start + 8, indexes.stop)))
            )


async def test_rollups_of_two_replicas_of_two_workers_add_up_to_what_the_node_counted(
    database_url: str, tmp_path: Path
) -> None:
    """A mixed run over 4 workers: the rollups' requests and tokens equal the requests sent and
    the node's prompt, generation and cache-hit token counters; an expired minute is purged."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "INSERT INTO usage_rollups VALUES (now() - interval '3 days', 'team-a', 'm', 'p',"
            " 'ok', 1, 1, 1, 1)"
        )
    finally:
        await connection.close()
    usage = {"flush_interval_seconds": 0.5, "retention_days": 1, "janitor_interval_seconds": 1}
    async with gateways(database_url, tmp_path, replicas=2, usage=usage) as (node, started, db):
        before = await node_counters(node)
        await send([gateway.url for gateway in started], range(48))
        after = await node_counters(node)

        async def all_flushed() -> bool:
            return bool((await rollup_totals(db))["requests"] == 48)

        await wait_until(all_flushed, timeout=20, message="48 requests in the rollups")
        totals = await rollup_totals(db)
        assert totals["prompt"] == after[COUNTERS[0]] - before[COUNTERS[0]] > 0
        assert totals["completion"] == after[COUNTERS[1]] - before[COUNTERS[1]] > 0
        assert totals["cached"] == after[COUNTERS[2]] - before[COUNTERS[2]] > 0

        async def purged() -> bool:
            return not await db.fetchval(
                "SELECT count(*) FROM usage_rollups WHERE minute < now() - interval '1 day'"
            )

        await wait_until(purged, timeout=20, message="the expired minute purged")
        assert (await rollup_totals(db))["requests"] == 48


def worker_pids(gateway: GatewayProcess) -> list[int]:
    """The worker processes of a `gateway serve --workers N` (children of its supervisor)."""
    assert gateway.process is not None
    pid = gateway.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="utf-8").split()
    return [int(child) for child in children]


async def test_a_killed_worker_loses_at_most_its_last_interval(
    database_url: str, tmp_path: Path
) -> None:
    """Requests flushed before the SIGKILL stay counted; at most the ones since the last flush
    are lost; restarted workers count again."""
    usage = {"flush_interval_seconds": 2}
    async with gateways(database_url, tmp_path, replicas=1, usage=usage) as (_, started, db):
        (gateway,) = started
        await send([gateway.url], range(8))

        async def flushed(count: int) -> bool:
            return bool((await rollup_totals(db))["requests"] >= count)

        await wait_until(lambda: flushed(8), timeout=10, message="the first 8 flushed")
        await send([gateway.url], range(8, 16))
        for pid in worker_pids(gateway):
            os.kill(pid, signal.SIGKILL)
        kept = (await rollup_totals(db))["requests"]
        assert 8 <= kept <= 16
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: answers(session, gateway.url), timeout=30, message="restart")
        await send([gateway.url], range(16, 24))
        await wait_until(lambda: flushed(kept + 8), timeout=10, message="the restarted workers")
        assert (await rollup_totals(db))["requests"] == kept + 8
