"""One app key carrying many conversations: spread over the nodes, each kept on one node."""

from __future__ import annotations

import asyncio
import random
from collections import Counter, defaultdict
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench import launcher
from gateway.config_fleet import hash_key
from tests.support.gateway import TEST_MODEL, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

CONVERSATIONS = 24
TURNS = 4
GATEWAYS = 4
APP_KEY = "sk-one-app-for-everyone"
SYSTEM = "You are the support assistant of a parcel service. Be brief. " * 20
DEAD_DATABASE = "postgresql://postgres:unused@127.0.0.1:9/none"


def body(conversation: int, turn: int) -> dict[str, Any]:
    """Turn `turn` of conversation `conversation`: the system prompt and the history so far."""
    messages: list[dict[str, str]] = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Where is parcel {conversation}?"},
    ]
    for earlier in range(1, turn + 1):
        messages.append({"role": "assistant", "content": f"On its way ({earlier})."})
        messages.append({"role": "user", "content": f"And now ({earlier})?"})
    return {"model": TEST_MODEL, "messages": messages, "max_tokens": 2}


async def cache_weighed(session: aiohttp.ClientSession, url: str, node: str, tokens: int) -> bool:
    """Whether the gateway's claims weigh `node`'s KV cache as `tokens` (its /metrics says so)."""
    async with session.get(url + "/metrics") as response:
        page = await response.text()
    return f'gateway_provider_cache_tokens{{provider="{node}"}} {float(tokens)}' in page


async def run(
    tmp_path: Path, database_url: str, *, full: str | None = None
) -> tuple[dict[int, set[str]], Counter[str]]:
    """24 conversations x 4 turns behind one key, each turn sent to a random gateway process;
    the `full` node reports a nearly full KV cache before the first turn."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(SimulatorProcess(name))
            for name in ("node-a", "node-b", "node-c")
        ]
        for node in nodes:
            if node.name == full:
                await node.set_faults(kv_cache_usage=0.95)
        config = settings_dict({node.name: node.url for node in nodes})
        config["database"] = {"url": database_url, "pool_min_size": 1, "pool_max_size": 4}
        config["affinity"] = {
            "scope": "conversation",
            "lookup_timeout_ms": 500,
            "claim_timeout_ms": 2000,
        }
        config["keys"] = [{"id": "app", "key_sha256": hash_key(APP_KEY)}]
        gateways = await stack.enter_async_context(
            launcher.gateways(tmp_path, [config] * GATEWAYS, workers=1)
        )
        nodes_of: dict[int, set[str]] = defaultdict(set)
        requests: Counter[str] = Counter()
        chooser = random.Random(4)
        async with aiohttp.ClientSession() as session:
            if full is not None:
                for gateway in gateways:
                    await wait_until(
                        lambda gateway=gateway: cache_weighed(  # type: ignore[misc]
                            session, gateway.url, full, 0
                        ),
                        timeout=30,
                        message=f"gateway on {gateway.port} reading {full}'s full cache",
                    )

            async def send(conversation: int, turn: int) -> None:
                gateway = chooser.choice(gateways)
                async with session.post(
                    gateway.url + "/v1/chat/completions",
                    data=orjson.dumps(body(conversation, turn)),
                    headers={"Authorization": f"Bearer {APP_KEY}"},
                ) as response:
                    await response.read()
                    assert response.status == 200
                    node = response.headers["x-gateway-provider"]
                nodes_of[conversation].add(node)
                requests[node] += 1

            for turn in range(TURNS):  # the conversations' turns interleave
                await asyncio.gather(*(send(index, turn) for index in range(CONVERSATIONS)))
        return nodes_of, requests


async def test_one_key_spreads_its_conversations_and_keeps_each_on_one_node(
    database_url: str, tmp_path: Path
) -> None:
    """Scope conversation, 4 gateway processes, one Postgres: all 3 nodes take conversations,
    none more than 1.3x its even share (new conversations of the key claim one at a time), and
    each conversation's turns reach one node."""
    nodes_of, requests = await run(tmp_path, database_url)
    assert {key: nodes for key, nodes in nodes_of.items() if len(nodes) > 1} == {}
    assert set(requests) == {"node-a", "node-b", "node-c"}
    even = CONVERSATIONS * TURNS / 3
    assert max(requests.values()) <= 1.3 * even, requests


async def test_a_node_whose_cache_is_nearly_full_takes_no_new_conversation(
    database_url: str, tmp_path: Path
) -> None:
    """node-c reports 95 % of its KV cache in use (vllm:kv_cache_usage_perc): the key's new
    conversations spread over node-a and node-b alone, each still on one node."""
    nodes_of, requests = await run(tmp_path, database_url, full="node-c")
    assert {key: nodes for key, nodes in nodes_of.items() if len(nodes) > 1} == {}
    assert set(requests) == {"node-a", "node-b"}, requests
    even = CONVERSATIONS * TURNS / 2
    assert max(requests.values()) <= 1.3 * even, requests


async def test_without_the_store_conversations_agree_by_rendezvous(tmp_path: Path) -> None:
    """Postgres unreachable: every process sends each conversation to the same node."""
    nodes_of, requests = await run(tmp_path, DEAD_DATABASE)
    assert {key: nodes for key, nodes in nodes_of.items() if len(nodes) > 1} == {}
    assert set(requests) == {"node-a", "node-b", "node-c"}
