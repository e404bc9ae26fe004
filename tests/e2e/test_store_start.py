"""`gateway serve` and its store at start-up: DATABASE_URL honoured, a cold burst not degraded."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from contextlib import AsyncExitStack
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
import pytest

from bench.launcher import GatewayProcess
from gateway.config_fleet import hash_key
from tests.support.gateway import TEST_KEY, answers, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

COLD_KEYS = 80
COLD_WORKERS = 8
BURST_CONCURRENCY = 32


async def test_database_url_is_used_when_the_config_has_no_database_section(
    database_url: str, tmp_path: Path
) -> None:
    """With DATABASE_URL set and no `database` section, the binding lands in that database and
    the worker logs where its store is, without the password."""
    async with SimulatorProcess("node-a") as node:
        config = settings_dict({"node-a": node.url})
        assert "database" not in config
        gateway = GatewayProcess(config, tmp_path, environment={"DATABASE_URL": database_url})
        gateway.start()
        try:
            async with aiohttp.ClientSession() as session:
                await wait_until(
                    lambda: answers(session, gateway.url), timeout=60, message="the gateway"
                )
                async with session.post(
                    gateway.url + "/v1/chat/completions",
                    data=orjson.dumps(chat_body(max_tokens=2)),
                    headers={"Authorization": f"Bearer {TEST_KEY}"},
                ) as response:
                    await response.read()
                    assert response.status == 200
                    assert response.headers["x-gateway-affinity"] == "miss"
        finally:
            gateway.stop()
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT api_key_id, provider FROM affinity_bindings")
    finally:
        await connection.close()
    assert [tuple(row.values()) for row in rows] == [("team-a", "node-a")]
    assert not (tmp_path / ".gateway").exists()  # no embedded Postgres was started
    log = gateway.log()
    parts = urlsplit(database_url)
    store_lines = [line for line in log.splitlines() if "affinity_store" in line]
    assert store_lines
    assert f'"port": {parts.port}' in store_lines[0] or f'"port":{parts.port}' in store_lines[0]
    assert parts.path.lstrip("/") in store_lines[0]
    assert parts.password
    assert parts.password not in log


async def test_a_cold_eight_worker_start_serves_a_burst_without_degrading(
    database_url: str, tmp_path: Path
) -> None:
    """Eight workers started cold, then 80 new keys at concurrency 32: no request is degraded,
    and every key's requests reach one node."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                SimulatorProcess(name, ["--recent-requests", str(COLD_KEYS * 2)])
            )
            for name in ("node-a", "node-b", "node-c")
        ]
        config = settings_dict({node.name: node.url for node in nodes})
        config["database"] = {"url": database_url}  # default pool and deadlines
        config["keys"] = [
            {"id": f"key-{index}", "key_sha256": hash_key(f"sk-cold-{index}")}
            for index in range(COLD_KEYS)
        ]
        gateway = GatewayProcess(config, tmp_path, workers=COLD_WORKERS)
        gateway.start()
        stack.callback(gateway.stop)
        limit = asyncio.Semaphore(BURST_CONCURRENCY)
        kinds: Counter[str] = Counter()
        nodes_per_key: dict[int, set[str]] = defaultdict(set)
        async with aiohttp.ClientSession() as session:
            await wait_until(
                lambda: answers(session, gateway.url), timeout=90, message="the gateway"
            )

            async def send(index: int) -> None:
                async with (
                    limit,
                    session.post(
                        gateway.url + "/v1/chat/completions",
                        data=orjson.dumps(chat_body(f"cold-key-{index}", max_tokens=2)),
                        headers={"Authorization": f"Bearer sk-cold-{index}"},
                    ) as response,
                ):
                    await response.read()
                    assert response.status == 200
                    kinds[response.headers["x-gateway-affinity"]] += 1
                    nodes_per_key[index].add(response.headers["x-gateway-provider"])

            burst = list(range(COLD_KEYS))
            random.Random(9).shuffle(burst)
            await asyncio.gather(*(send(index) for index in burst))
            await asyncio.gather(*(send(index) for index in burst))
    assert kinds["degraded"] == 0, kinds
    assert kinds["miss"] + kinds["hit"] == 2 * COLD_KEYS, kinds
    assert {index: len(names) for index, names in nodes_per_key.items()} == dict.fromkeys(
        range(COLD_KEYS), 1
    )
