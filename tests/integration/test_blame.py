"""Issue 13, blame: a provider cools for its own faults, never for one client's requests."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from aiohttp.test_utils import TestServer

from bench.launcher import free_port
from gateway.config import Settings
from gateway.dispatch.health import ProviderHealth
from gateway.operations.app_keys import METRICS, RUNTIME
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import OTHER_KEY, TEST_KEY, TEST_MODEL, chat_body, settings_dict
from tests.support.simulators import InProcessSimulator

POISON = "POISON-7f3a"
ROUNDS = 30


def config_for(upstreams: dict[str, str], **sections: Any) -> Settings:
    """Two keys that may both use every model, in front of these upstreams."""
    config = settings_dict(upstreams, extra=sections)
    config["keys"][1]["models"] = ["*"]
    return Settings.model_validate(config)


async def chat(
    session: aiohttp.ClientSession, server: TestServer, key: str, content: str = "hello"
) -> tuple[int, dict[str, Any]]:
    """One chat completion with this key; its status and the JSON answer."""
    body = chat_body(max_tokens=2) | {"messages": [{"role": "user", "content": content}]}
    async with session.post(
        server.make_url("/v1/chat/completions"),
        data=orjson.dumps(body),
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, await response.json()


def health_of(server: TestServer) -> ProviderHealth:
    """The gateway's per-process provider health."""
    health: ProviderHealth = server.app[RUNTIME].current.router.health
    return health


def cooldown_gauge(server: TestServer, provider: str) -> float | None:
    """The published `gateway_provider_cooldown_seconds` of a provider."""
    server.app[RUNTIME].current.router.publish_gauges()
    return server.app[METRICS].registry.get_sample_value(
        "gateway_provider_cooldown_seconds", {"provider": provider}
    )


@pytest.mark.parametrize(
    "poisoned", [("node-a",), ("node-a", "node-b")], ids=["one-node-bug", "every-node-bug"]
)
async def test_a_key_sending_poisoned_requests_cannot_make_another_keys_request_fail(
    start_simulator: SimulatorFactory,
    start_gateway: GatewayFactory,
    poisoned: tuple[str, ...],
) -> None:
    """Key A sends requests that 500 (on one node, or on every node) while key B works: B's
    requests all succeed and no provider cools, whatever A does."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b")]
    for node in nodes:
        if node.name in poisoned:
            await node.set_faults(error_on_text=POISON)
    server = await start_gateway(
        config_for(
            {node.name: node.url for node in nodes},
            models=[{"name": TEST_MODEL, "stickiness": "none"}],
            routing={"allowed_fails": 2},
        )
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(ROUNDS):
            attacked = [await chat(session, server, TEST_KEY, f"say {POISON}") for _ in range(3)]
            # A poison one node trips over fails over to the other; one every node trips over
            # reaches the client as the upstream's 500.
            assert {status for status, _ in attacked} == ({200} if len(poisoned) == 1 else {500})
            victim = await asyncio.gather(*(chat(session, server, OTHER_KEY) for _ in range(2)))
            assert [status for status, _ in victim] == [200, 200], victim
    poisoned_requests = sum([(await node.stats()).completion_requests for node in nodes])
    assert poisoned_requests >= ROUNDS * 4
    for node in nodes:
        assert not health_of(server).cooling(node.name)
        assert cooldown_gauge(server, node.name) == 0


async def test_two_keys_failing_on_a_broken_provider_cool_it_within_a_few_requests(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A node that answers 500 to everyone cools once two keys have met it: within
    allowed_fails of its failures; every request is still answered by the healthy node."""
    broken = await start_simulator("node-a")
    healthy = await start_simulator("node-b")
    await broken.set_faults(error_rate=1.0)
    server = await start_gateway(
        config_for(
            {"node-a": broken.url, "node-b": healthy.url},
            models=[{"name": TEST_MODEL, "stickiness": "none"}],
        )
    )
    async with aiohttp.ClientSession() as session:
        for number in range(10):
            key = TEST_KEY if number % 2 == 0 else OTHER_KEY
            assert (await chat(session, server, key))[0] == 200
    assert health_of(server).cooling("node-a")
    assert cooldown_gauge(server, "node-a") == pytest.approx(5, abs=1)
    assert (await broken.stats()).completion_requests == 3  # allowed_fails
    assert not health_of(server).cooling("node-b")


async def test_two_keys_cannot_cool_more_than_the_share_of_a_models_providers(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Two providers, max_cooling_fraction 0.5, both answering 500 to two keys' single-attempt
    requests: one cools, the other never does."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b")]
    for node in nodes:
        await node.set_faults(error_rate=1.0)
    server = await start_gateway(
        config_for(
            {node.name: node.url for node in nodes},
            models=[{"name": TEST_MODEL, "stickiness": "none"}],
            routing={"failover_budget": 1, "max_cooling_fraction": 0.5, "cooldown_seconds": 60},
        )
    )
    health = health_of(server)
    async with aiohttp.ClientSession() as session:
        for number in range(20):
            # Requests take turns between the nodes: each key sends two in a row, so that both
            # keys meet both nodes.
            key = TEST_KEY if number // 2 % 2 == 0 else OTHER_KEY
            assert (await chat(session, server, key))[0] == 500
    assert sorted(health.cooling(node.name) for node in nodes) == [False, True]
    still_serving = next(node for node in nodes if not health.cooling(node.name))
    assert (await still_serving.stats()).completion_requests >= 10


async def test_an_unreachable_provider_cools_whatever_the_share(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With max_cooling_fraction 0, a provider refusing connections still cools after
    allowed_fails attempts, and the next requests go straight to the live node."""
    live = await start_simulator("node-b")
    dead = f"http://127.0.0.1:{free_port()}"
    server = await start_gateway(
        config_for(
            {"node-a": dead, "node-b": live.url},
            models=[{"name": TEST_MODEL, "stickiness": "none"}],
            routing={"max_cooling_fraction": 0},
        )
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(8):
            assert (await chat(session, server, TEST_KEY))[0] == 200
    assert health_of(server).cooling("node-a")
    assert (await live.stats()).completion_requests == 8


async def test_one_key_failing_alone_leaves_a_single_provider_serving_others(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A model with one provider: a key's poisoned requests fail, the other key's never do."""
    node: InProcessSimulator = await start_simulator("node-a")
    await node.set_faults(error_on_text=POISON)
    server = await start_gateway(config_for({"node-a": node.url}, routing={"allowed_fails": 1}))
    async with aiohttp.ClientSession() as session:
        for _ in range(10):
            assert (await chat(session, server, TEST_KEY, POISON))[0] == 500
            assert (await chat(session, server, OTHER_KEY))[0] == 200
    assert not health_of(server).cooling("node-a")


async def test_a_draining_provider_does_not_widen_the_share(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With node-b draining, node-a is the model's only provider: two keys' 500s from it never
    cool it (the cooldown is withheld, logged and counted once), so requests keep reaching it."""
    broken = await start_simulator("node-a")
    draining = await start_simulator("node-b")
    await broken.set_faults(error_rate=1.0)
    settings = config_for(
        {"node-a": broken.url, "node-b": draining.url}, routing={"allowed_fails": 2}
    )
    providers = [settings.providers[0], settings.providers[1].model_copy(update={"draining": True})]
    server = await start_gateway(settings.model_copy(update={"providers": providers}))
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            for number in range(8):
                key = TEST_KEY if number % 2 == 0 else OTHER_KEY
                assert (await chat(session, server, key))[0] == 500
    assert not health_of(server).cooling("node-a")
    assert (await broken.stats()).completion_requests == 8
    assert (await draining.stats()).completion_requests == 0
    withheld = [entry for entry in logs if entry["event"] == "cooldown_withheld"]
    assert [entry["provider"] for entry in withheld] == ["node-a"]
    assert health_of(server).withholding("node-a")
    assert (
        server.app[METRICS].registry.get_sample_value(
            "gateway_cooldowns_withheld_total", {"provider": "node-a"}
        )
        == 1.0
    )


async def test_one_keys_timeouts_do_not_cool_a_provider_but_two_keys_do(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A node that accepts and never answers: key A's timeouts alone leave it in rotation (a
    long request is the client's to make); once key B times out there too, it cools."""
    hung = await start_simulator("node-a")
    healthy = await start_simulator("node-b")
    await hung.set_faults(hold=True)
    server = await start_gateway(
        config_for(
            {"node-a": hung.url, "node-b": healthy.url},
            models=[{"name": TEST_MODEL, "stickiness": "none"}],
            routing={"response_timeout_seconds": 0.3},
        )
    )
    async with aiohttp.ClientSession() as session:
        first = [(await chat(session, server, TEST_KEY))[0] for _ in range(12)]
        assert set(first) == {200, 504}
        assert first.count(504) >= 3  # allowed_fails
        assert not health_of(server).cooling("node-a")
        # Requests take turns between the nodes: B's first or second meets the hung one.
        second = [(await chat(session, server, OTHER_KEY))[0] for _ in range(2)]
        assert 504 in second
    assert health_of(server).cooling("node-a")
