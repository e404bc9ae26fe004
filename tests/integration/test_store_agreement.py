"""Gateways that cannot ask the store still agree on each key's node (rendezvous hashing)."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from affinity_store.embedded import EmbeddedPostgres
from gateway.config import Settings
from gateway.config_fleet import hash_key
from gateway.routing.rendezvous import rendezvous_order
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, chat_body, settings_dict

pytestmark = pytest.mark.timeout(120)

KEYS = 40
REQUESTS_PER_KEY = 4
GATEWAYS = 4


async def test_gateways_agree_on_every_key_with_postgres_down_from_the_start(
    dedicated_postgres: EmbeddedPostgres,
    start_simulator: SimulatorFactory,
    start_gateway: GatewayFactory,
) -> None:
    """Postgres stopped before the first request; 40 keys sent to 4 gateways at random: each
    key's requests all reach one node, and the keys still spread over every node."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b", "node-c")]
    await asyncio.to_thread(dedicated_postgres.stop, "fast")
    config = settings_dict(
        {node.name: node.url for node in nodes},
        extra={
            "database": {"url": dedicated_postgres.url, "pool_min_size": 1},
            # Latency bands are per process by design; here every node is equally fast and the
            # test is about the tie between them, so keep bands out of it.
            "routing": {"latency_min_samples": 10_000},
        },
    )
    config["keys"] = [
        {"id": f"key-{index}", "key_sha256": hash_key(f"sk-agree-{index}")} for index in range(KEYS)
    ]
    # Each in-process gateway has its own router, random tie-break and store client, like a
    # separate process would.
    servers = [await start_gateway(Settings.model_validate(config)) for _ in range(GATEWAYS)]
    jobs = [index for index in range(KEYS) for _ in range(REQUESTS_PER_KEY)]
    random.Random(3).shuffle(jobs)
    chooser = random.Random(5)
    nodes_per_key: dict[int, set[str]] = defaultdict(set)
    kinds: set[str] = set()
    async with aiohttp.ClientSession() as session:
        for index in jobs:
            server = chooser.choice(servers)
            async with session.post(
                server.make_url("/v1/chat/completions"),
                data=orjson.dumps(chat_body(max_tokens=2)),
                headers={"Authorization": f"Bearer sk-agree-{index}"},
            ) as response:
                await response.read()
                assert response.status == 200
                kinds.add(response.headers["x-gateway-affinity"])
                nodes_per_key[index].add(response.headers["x-gateway-provider"])
    assert kinds == {"degraded"}
    assert {index: len(names) for index, names in nodes_per_key.items()} == dict.fromkeys(
        range(KEYS), 1
    )
    assert {name for names in nodes_per_key.values() for name in names} == {
        "node-a",
        "node-b",
        "node-c",
    }


async def test_a_degraded_gateway_picks_the_node_the_claim_bound(
    dedicated_postgres: EmbeddedPostgres,
    start_simulator: SimulatorFactory,
    start_gateway: GatewayFactory,
) -> None:
    """A claim binds the key's rendezvous winner; a gateway that never saw the key and cannot
    reach the store routes it to that same node."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b", "node-c")]
    config = settings_dict(
        {node.name: node.url for node in nodes},
        extra={
            "database": {"url": dedicated_postgres.url, "pool_min_size": 1},
            "routing": {"latency_min_samples": 10_000},
        },
    )
    claimer = await start_gateway(Settings.model_validate(config))
    bystander = await start_gateway(Settings.model_validate(config))
    winner = rendezvous_order("team-a", TEST_MODEL, ["node-a", "node-b", "node-c"])[0]
    async with aiohttp.ClientSession() as session:

        async def chat(server: TestServer) -> tuple[str, str]:
            async with session.post(
                server.make_url("/v1/chat/completions"),
                data=orjson.dumps(chat_body(max_tokens=2)),
                headers={"Authorization": f"Bearer {TEST_KEY}"},
            ) as response:
                await response.read()
                assert response.status == 200
                return response.headers["x-gateway-affinity"], response.headers[
                    "x-gateway-provider"
                ]

        assert await chat(claimer) == ("miss", winner)
        await asyncio.to_thread(dedicated_postgres.stop, "fast")
        assert await chat(bystander) == ("degraded", winner)
