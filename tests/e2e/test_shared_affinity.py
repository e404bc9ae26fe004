"""Several gateway processes, one Postgres: each key's requests all reach one node."""

from __future__ import annotations

import asyncio
import random
import re
from collections import defaultdict
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import orjson
import pytest

from bench import launcher
from gateway.config_fleet import hash_key
from gateway.selection.affinity import AGREEMENT_MIN_BINDINGS
from tests.support.gateway import chat_body, settings_dict
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

KEYS = 50
REQUESTS_PER_KEY = 20
WORKERS = 4
MARKER = re.compile(rb"affinity-key-(\d+)")


async def test_every_key_stays_on_one_node_across_four_gateways(
    database_url: str, tmp_path: Path
) -> None:
    """50 keys x 20 requests sent to random gateways: the simulators see each key on one node."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                SimulatorProcess(name, ["--recent-requests", str(KEYS * REQUESTS_PER_KEY)])
            )
            for name in ("node-a", "node-b", "node-c")
        ]
        config = settings_dict({node.name: node.url for node in nodes})
        config["database"] = {"url": database_url, "pool_min_size": 4, "pool_max_size": 8}
        # Nine processes share two cores here; a 50 ms deadline measures that contention, not
        # the store. Deadlines have their own tests; this one is about agreement across workers.
        config["affinity"] = {"lookup_timeout_ms": 500, "claim_timeout_ms": 2000}
        config["keys"] = [
            {"id": f"key-{index}", "key_sha256": hash_key(f"sk-affinity-{index}")}
            for index in range(KEYS)
        ]
        gateways = await stack.enter_async_context(
            launcher.gateways(tmp_path, [config] * WORKERS, workers=1)
        )
        async with aiohttp.ClientSession() as session:
            jobs = [index for index in range(KEYS) for _ in range(REQUESTS_PER_KEY)]
            random.Random(7).shuffle(jobs)
            limit = asyncio.Semaphore(16)
            chooser = random.Random(11)

            async def send(index: int) -> int:
                gateway = chooser.choice(gateways)
                body = chat_body(f"affinity-key-{index}: hello", max_tokens=2)
                async with (
                    limit,
                    session.post(
                        gateway.url + "/v1/chat/completions",
                        data=orjson.dumps(body),
                        headers={"Authorization": f"Bearer sk-affinity-{index}"},
                    ) as response,
                ):
                    await response.read()
                    return response.status

            statuses = await asyncio.gather(*(send(index) for index in jobs))
        assert set(statuses) == {200}
        nodes_per_key: dict[int, set[str]] = defaultdict(set)
        received = 0
        for node in nodes:
            for request in (await node.stats()).recent_requests:
                match = MARKER.search(request.body)
                assert match is not None
                nodes_per_key[int(match.group(1))].add(node.name)
                received += 1
        assert received == KEYS * REQUESTS_PER_KEY
        assert {key: len(names) for key, names in nodes_per_key.items()} == dict.fromkeys(
            range(KEYS), 1
        )
        load = [sum(1 for names in nodes_per_key.values() if node.name in names) for node in nodes]
        # Cluster-wide spread: a claim keeps the rendezvous winner until it holds more than
    # AGREEMENT_MIN_BINDINGS more bindings than the least-bound node, so at most one more apart.
    assert max(load) - min(load) <= AGREEMENT_MIN_BINDINGS + 1, load
