"""Metrics and logs after a scripted sequence: exact counts, no secrets, attempts with reasons."""

from __future__ import annotations

from contextlib import AsyncExitStack

import aiohttp
import orjson
import structlog
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.store import StoreUnavailable
from gateway.app import create_app
from gateway.config import Settings
from gateway.config_fleet import hash_key
from gateway.operations.app_keys import LOAD
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import (
    TEST_KEY,
    TEST_MODEL,
    UPSTREAM_MODEL,
    build_settings,
    chat_body,
    settings_dict,
)
from tests.support.polling import wait_until

UPSTREAM_SECRET = "upstream-credential-7c1d9e"
PROMPT = "observability-prompt-fragment-5521"


async def chat(session: aiohttp.ClientSession, server: TestServer) -> tuple[str, str]:
    """One chat completion; its provider and affinity headers."""
    async with session.post(
        server.make_url("/v1/chat/completions"),
        data=orjson.dumps(chat_body(PROMPT, max_tokens=2)),
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    ) as response:
        assert response.status == 200
        await response.read()
        return response.headers["x-gateway-provider"], response.headers["x-gateway-affinity"]


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus-client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_scripted_sequence_gives_exact_metrics_and_clean_logs(
    start_simulator: SimulatorFactory,
) -> None:
    """miss, hits, a failover, a spill and a degraded period: each counted exactly once."""
    nodes = {name: await start_simulator(name) for name in ("node-a", "node-b", "node-c")}
    config = settings_dict(
        {name: node.url for name, node in nodes.items()},
        extra={
            "affinity": {"local_cache_seconds": 0},
            "routing": {"load_poll_interval_seconds": 0.05, "allowed_fails": 100},
        },
    )
    for provider in config["providers"]:
        provider["api_key"] = UPSTREAM_SECRET
    store = MemoryAffinityStore()
    app = create_app(Settings.model_validate(config), store=store)
    async with AsyncExitStack() as stack:
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        stack.push_async_callback(server.close)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        with structlog.testing.capture_logs() as logs:
            first, kind = await chat(session, server)
            assert kind == "miss"
            for _ in range(2):
                assert await chat(session, server) == (first, "hit")

            await nodes[first].set_faults(error_rate=1.0)
            second, kind = await chat(session, server)
            assert (second != first, kind) == (True, "rebound")
            await nodes[first].set_faults(error_rate=0.0)

            async def moved() -> bool:
                binding = await store.lookup("team-a", TEST_MODEL, timeout=1)
                return binding is not None and binding.provider == second

            await wait_until(moved, message="the rebind to land")

            poller = app[LOAD]
            await nodes[second].set_faults(extra_waiting=100)
            await wait_until(lambda: poller.load(second) >= 100, message="the load to be seen")
            third, kind = await chat(session, server)
            assert (third != second, kind) == (True, "spill")
            await nodes[second].set_faults(extra_waiting=0)
            await wait_until(lambda: poller.load(second) == 0, message="the load to drop")

            store.fail_with(StoreUnavailable("down for the test"))
            for _ in range(2):
                assert (await chat(session, server))[1] == "degraded"
            store.fail_with(None)

        async with session.get(server.make_url("/metrics")) as response:
            text = await response.text()

    values = samples(text)
    affinity = {
        dict(labels)["kind"]: value
        for (name, labels), value in values.items()
        if name == "gateway_affinity_results_total"
    }
    assert affinity == {"miss": 1, "hit": 2, "rebound": 1, "spill": 1, "degraded": 2}
    served = sum(
        value
        for (name, labels), value in values.items()
        if name == "gateway_requests_total" and dict(labels)["status_class"] == "2xx"
    )
    assert served == 7
    assert values[("gateway_request_duration_seconds_count", (("model", TEST_MODEL),))] == 7
    failures = {
        (dict(labels)["provider"], dict(labels)["outcome"]): value
        for (name, labels), value in values.items()
        if name == "gateway_upstream_attempts_total" and dict(labels)["outcome"] != "ok"
    }
    assert failures == {(first, "http_500"): 1}
    store_calls = {
        (dict(labels)["operation"], dict(labels)["outcome"]): value
        for (name, labels), value in values.items()
        if name == "gateway_store_call_duration_seconds_count"
    }
    assert store_calls == {
        ("lookup", "ok"): 5,
        ("claim", "ok"): 1,
        ("rebind", "ok"): 1,
        ("lookup", "StoreUnavailable"): 2,
    }

    for label_values in (dict(labels).values() for _, labels in values):
        for value in label_values:
            assert value not in {TEST_KEY, hash_key(TEST_KEY), UPSTREAM_SECRET}
            assert PROMPT not in value

    requests = [entry for entry in logs if entry["event"] == "request"]
    assert len(requests) == 7
    failover = next(entry for entry in requests if entry["affinity"] == "rebound")
    assert failover["attempts"] == [f"{first}:http_500", f"{second}:ok"]
    assert failover["key_id"] == "team-a"
    captured = repr(logs)
    for secret in (TEST_KEY, hash_key(TEST_KEY), UPSTREAM_SECRET, PROMPT):
        assert secret not in captured


async def test_requests_naming_no_model_are_counted_with_an_empty_model_label(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """`GET`/`DELETE /v1/responses/{id}` are counted (model `""`), found or not; bad keys not."""
    node = await start_simulator("node-a", models=[UPSTREAM_MODEL])
    server = await start_gateway(build_settings({"node-a": node.url}))
    auth = {"Authorization": f"Bearer {TEST_KEY}"}
    async with aiohttp.ClientSession() as session:
        created = await session.post(
            server.make_url("/v1/responses"),
            data=orjson.dumps({"model": TEST_MODEL, "input": "Hello"}),
            headers={**auth, "Content-Type": "application/json"},
        )
        assert created.status == 200
        response_id = (await created.json())["id"]
        path = f"/v1/responses/{response_id}"
        calls = [("GET", path, auth, 200), ("DELETE", path, auth, 200)]
        calls += [("GET", "/v1/responses/resp_unknown", auth, 404)]
        calls += [("GET", path, {"Authorization": "Bearer sk-wrong-key-000000"}, 401)]
        for method, url, headers, status in calls:
            async with session.request(method, server.make_url(url), headers=headers) as answer:
                assert answer.status == status
        scrape = await (await session.get(server.make_url("/metrics"))).text()
    counted = samples(scrape)
    requests = {
        labels: value
        for (name, labels), value in counted.items()
        if name == "gateway_requests_total"
    }
    assert requests == {
        (("model", TEST_MODEL), ("provider", "node-a"), ("status_class", "2xx")): 1.0,
        (("model", ""), ("provider", "node-a"), ("status_class", "2xx")): 2.0,
        (("model", ""), ("provider", "none"), ("status_class", "4xx")): 1.0,
    }
    assert counted[("gateway_request_duration_seconds_count", (("model", ""),))] == 3.0
    attempts = ("gateway_upstream_attempts_total", (("outcome", "ok"), ("provider", "node-a")))
    assert counted[attempts] == 3.0
