"""Dispatch under failure: permits, key limits, cooldowns, spill, and clean stream errors."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.config import Settings
from gateway.operations.app_keys import AFFINITY, LIFECYCLE, LOAD, METRICS, RUNTIME
from gateway.simulator import Timing
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.conformance import post_until_broken
from tests.support.gateway import OTHER_KEY, TEST_KEY, TEST_MODEL, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import InProcessSimulator

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
NOT_STICKY = {"name": TEST_MODEL, "stickiness": "none"}


async def post(
    session: aiohttp.ClientSession, server: TestServer, body: dict[str, Any] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    """One chat completion through the gateway."""
    async with session.post(
        server.make_url("/v1/chat/completions"),
        data=orjson.dumps(body or chat_body(max_tokens=2)),
        headers=AUTH,
    ) as response:
        return response.status, CIMultiDict(response.headers), await response.read()


async def gateway_for(
    start_gateway: GatewayFactory,
    nodes: list[InProcessSimulator],
    **sections: Any,
) -> TestServer:
    """A gateway in front of the nodes, with config sections merged in."""
    config = settings_dict({node.name: node.url for node in nodes}, extra=sections)
    return await start_gateway(Settings.model_validate(config))


async def test_provider_concurrency_is_capped_and_late_waiters_get_503(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """max_concurrency 2: the node never sees more than 2 at once; waiters past the timeout 503."""
    node = await start_simulator("node-a")
    await node.set_faults(hold=True)
    config = settings_dict({"node-a": node.url}, extra={"routing": {"wait_timeout_seconds": 0.5}})
    config["providers"][0]["max_concurrency"] = 2
    server = await start_gateway(Settings.model_validate(config))
    async with aiohttp.ClientSession() as session:
        requests = [asyncio.create_task(post(session, server)) for _ in range(10)]
        await wait_until(
            lambda: sum(task.done() for task in requests) == 8, message="eight waiters to give up"
        )
        assert (await node.stats()).in_flight == 2
        await node.set_faults(hold=False)
        outcomes = await asyncio.gather(*requests)
    statuses = sorted(status for status, _, _ in outcomes)
    assert statuses == [200] * 2 + [503] * 8
    for status, headers, body in outcomes:
        if status == 503:
            assert headers["Retry-After"] == "1"
            assert orjson.loads(body)["error"]["code"] == "providers_busy"
    assert (await node.stats()).peak_in_flight == 2


async def test_waiters_are_served_in_turn_within_the_wait_timeout(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With room to wait, ten requests through two permits all succeed, two at a time."""
    node = await start_simulator("node-a", timing=Timing(0, 0, 200, 64))
    config = settings_dict({"node-a": node.url}, extra={"routing": {"wait_timeout_seconds": 30}})
    config["providers"][0]["max_concurrency"] = 2
    server = await start_gateway(Settings.model_validate(config))
    async with aiohttp.ClientSession() as session:
        outcomes = await asyncio.gather(
            *(post(session, server, chat_body(max_tokens=10)) for _ in range(10))
        )
    assert [status for status, _, _ in outcomes] == [200] * 10
    assert (await node.stats()).peak_in_flight == 2
    assert server.app[RUNTIME].proxy.router.permits.in_flight("node-a") == 0


async def test_key_concurrency_limit_is_a_429_at_once(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A key over its max_concurrency gets 429 with Retry-After immediately."""
    node = await start_simulator("node-a")
    await node.set_faults(hold=True)
    config = settings_dict({"node-a": node.url})
    config["keys"][0]["max_concurrency"] = 1
    server = await start_gateway(Settings.model_validate(config))
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(post(session, server))
        await wait_until(lambda: _in_flight(node, 1), message="the first request in flight")
        started = time.monotonic()
        status, headers, body = await post(session, server)
        assert time.monotonic() - started < 1.0
        assert status == 429
        assert headers["Retry-After"] == "1"
        assert orjson.loads(body)["error"]["code"] == "key_concurrency_limit"
        await node.set_faults(hold=False)
        assert (await first)[0] == 200
        assert (await post(session, server))[0] == 200


async def test_key_start_interval_is_a_429_with_the_wait(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A key with min_start_interval_ms gets 429 when it starts requests faster than that."""
    node = await start_simulator("node-a")
    config = settings_dict({"node-a": node.url})
    config["keys"][0]["min_start_interval_ms"] = 60_000
    server = await start_gateway(Settings.model_validate(config))
    async with aiohttp.ClientSession() as session:
        assert (await post(session, server))[0] == 200
        status, headers, body = await post(session, server)
    assert status == 429
    assert 50 <= int(headers["Retry-After"]) <= 60
    assert orjson.loads(body)["error"]["code"] == "key_rate_limit"


async def _in_flight(node: InProcessSimulator, count: int) -> bool:
    return (await node.stats()).in_flight == count


async def test_rate_limited_node_gets_nothing_until_its_retry_after_passes(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """After a 429 with Retry-After: 7, this worker sends that node nothing for about 7 s."""
    limited = await start_simulator("node-a")
    healthy = await start_simulator("node-b")
    await limited.set_faults(rate_limit_retry_after=7)
    server = await gateway_for(start_gateway, [limited, healthy], models=[NOT_STICKY])
    async with aiohttp.ClientSession() as session:
        while (await limited.stats()).completion_requests == 0:
            assert (await post(session, server))[0] == 200
        limited_at = time.monotonic()
        await limited.set_faults(rate_limit_retry_after=None)
        while (await limited.stats()).completed == 0 and time.monotonic() - limited_at < 12:
            status, _, _ = await post(session, server)
            assert status == 200
            await asyncio.sleep(0.05)
        back_after = time.monotonic() - limited_at
    assert 6.5 <= back_after <= 9, back_after
    assert (await limited.stats()).completion_requests == 2


async def test_all_candidates_cooling_is_a_429_with_the_soonest_retry_after(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Every node rate limited: the next request is refused with the soonest Retry-After."""
    first = await start_simulator("node-a")
    second = await start_simulator("node-b")
    await first.set_faults(rate_limit_retry_after=5)
    await second.set_faults(rate_limit_retry_after=9)
    server = await gateway_for(start_gateway, [first, second], models=[NOT_STICKY])
    async with aiohttp.ClientSession() as session:
        status, headers, _ = await post(session, server)
        assert status == 429
        assert headers["Retry-After"] == "5"
        status, headers, body = await post(session, server)
    assert status == 429
    assert headers["Retry-After"] == "5"
    assert orjson.loads(body)["error"]["code"] == "providers_cooling"
    assert (await first.stats()).completion_requests == 1
    assert (await second.stats()).completion_requests == 1


async def test_consecutive_failures_cool_a_node_and_a_success_resets_the_count(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """allowed_fails failures in a row start a cooldown; the cooled node gets no attempts.

    Issue 13: a 5xx counts only once the run holds failures from two keys, so the requests
    alternate between the two keys (one key's 5xx alone never cools a provider).
    """
    broken = await start_simulator("node-a")
    healthy = await start_simulator("node-b")
    await broken.set_faults(error_rate=1.0)
    config = settings_dict(
        {"node-a": broken.url, "node-b": healthy.url},
        extra={"models": [NOT_STICKY], "routing": {"allowed_fails": 2, "cooldown_seconds": 30}},
    )
    config["keys"][1]["models"] = ["*"]
    server = await start_gateway(Settings.model_validate(config))
    health = server.app[RUNTIME].proxy.router.health
    async with aiohttp.ClientSession() as session:
        for number in range(8):
            key = TEST_KEY if number % 2 == 0 else OTHER_KEY
            async with session.post(
                server.make_url("/v1/chat/completions"),
                data=orjson.dumps(chat_body(max_tokens=2)),
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                assert response.status == 200
    assert health.cooling("node-a")
    assert 25 < health.cooling_remaining("node-a") <= 30
    assert (await broken.stats()).completion_requests == 2


async def test_dropped_stream_is_counted_as_a_provider_failure(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A stream cut after some chunks ends with an error line and a broken transfer, and counts
    against the node."""
    node = await start_simulator("node-a")
    await node.set_faults(drop_after_chunks=2)
    server = await gateway_for(start_gateway, [node])
    status, _, body, broken = await asyncio.wait_for(
        post_until_broken(
            str(server.make_url("/v1/chat/completions")),
            orjson.dumps(chat_body(stream=True, max_tokens=8)),
            AUTH,
        ),
        timeout=10,
    )
    assert status == 200
    assert broken
    assert body.rstrip().endswith(b"}")
    assert b'"upstream_dropped"' in body
    metrics = server.app[METRICS].registry
    assert (
        metrics.get_sample_value(
            "gateway_upstream_attempts_total",
            {"provider": "node-a", "outcome": "dropped_mid_stream"},
        )
        == 1
    )


async def test_client_disconnect_cancels_upstream_at_once_and_frees_the_permit(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """The node sees the cancellation within 100 ms of the client leaving; permits go to 0."""
    node = await start_simulator("node-a", timing=Timing(0, 0, 10, 64))
    config = settings_dict({"node-a": node.url})
    config["providers"][0]["max_concurrency"] = 4
    server = await start_gateway(Settings.model_validate(config))
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            server.make_url("/v1/chat/completions"),
            data=orjson.dumps(chat_body(stream=True, max_tokens=100)),
            headers=AUTH,
        )
        await response.content.readany()
        closed_at = time.monotonic()
        response.close()
    await wait_until(lambda: _cancelled(node), timeout=5, message="the node to see the cancel")
    cancelled_at = (await node.stats()).last_cancelled_at
    assert cancelled_at is not None
    assert cancelled_at - closed_at < 0.1
    router = server.app[RUNTIME].proxy.router
    await wait_until(lambda: router.permits.in_flight("node-a") == 0, message="permit released")
    assert not router.health.cooling("node-a")


async def _cancelled(node: InProcessSimulator) -> bool:
    return (await node.stats()).cancelled == 1


async def test_loaded_bound_node_is_skipped_for_one_request_without_rebinding(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A bound node reporting 100 waiting while the others report 0: this request spills."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b", "node-c")]
    server = await gateway_for(start_gateway, nodes, routing={"load_poll_interval_seconds": 0.05})
    by_name = {node.name: node for node in nodes}
    async with aiohttp.ClientSession() as session:
        _, headers, _ = await post(session, server)
        bound = headers["x-gateway-provider"]
        await by_name[bound].set_faults(extra_waiting=100)
        poller = server.app[LOAD]
        await wait_until(lambda: poller.load(bound) >= 100, message="the load to be polled")
        status, headers, _ = await post(session, server)
        assert status == 200
        assert headers["x-gateway-affinity"] == "spill"
        assert headers["x-gateway-provider"] != bound
        binding = await server.app[AFFINITY].store.lookup("team-a", TEST_MODEL, timeout=1)
        assert binding is not None
        assert binding.provider == bound
        await by_name[bound].set_faults(extra_waiting=0)
        await wait_until(lambda: poller.load(bound) == 0, message="the load to drop")
        _, headers, _ = await post(session, server)
    assert headers["x-gateway-provider"] == bound
    assert headers["x-gateway-affinity"] == "hit"


async def test_readyz_waits_for_every_worker_of_the_gateway(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Under a supervisor, /readyz is 503 until every worker's listening flag is set."""
    node = await start_simulator("node-a")
    server = await gateway_for(start_gateway, [node])
    flags = [1, 0]
    server.app[LIFECYCLE].workers_listening = flags
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/readyz")) as response:
            assert response.status == 503
            answer = await response.json()
        assert answer["reason"] == "not every worker of this gateway listens yet"
        assert answer["error"]["code"] == "not_ready"
        flags[1] = 1
        async with session.get(server.make_url("/readyz")) as response:
            assert response.status == 200


async def test_readyz_fails_only_while_every_provider_is_cooling(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """/readyz is 503 while all providers cool down, 200 otherwise."""
    node = await start_simulator("node-a")
    await node.set_faults(rate_limit_retry_after=30)
    server = await gateway_for(start_gateway, [node])
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/readyz")) as response:
            assert response.status == 200
        assert (await post(session, server))[0] == 429
        async with session.get(server.make_url("/readyz")) as response:
            assert response.status == 503
            assert (await response.json())["reason"] == "every provider is cooling"
