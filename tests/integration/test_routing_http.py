"""Routing policy through HTTP against simulators: stickiness, spread, preferences, auto model."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from gateway.config import Settings
from gateway.config_fleet import hash_key
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, chat_body, settings_dict
from tests.support.simulators import InProcessSimulator

NAMES = ("node-a", "node-b", "node-c")


async def three_nodes(start_simulator: SimulatorFactory) -> list[InProcessSimulator]:
    """Three instant simulators."""
    return [await start_simulator(name) for name in NAMES]


async def chat(
    server: TestServer,
    body: dict[str, Any],
    *,
    key: str = TEST_KEY,
    headers: dict[str, str] | None = None,
) -> tuple[int, CIMultiDict[str], dict[str, Any]]:
    """POST a chat completion; status, headers, parsed body."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        ) as response,
    ):
        return response.status, CIMultiDict(response.headers), orjson.loads(await response.read())


async def test_shared_binding_keeps_a_key_on_one_node(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A key's first request binds (miss); the rest hit the same node."""
    nodes = await three_nodes(start_simulator)
    server = await start_gateway(
        Settings.model_validate(settings_dict({node.name: node.url for node in nodes}))
    )
    seen = []
    for _ in range(6):
        status, headers, _ = await chat(server, chat_body())
        assert status == 200
        seen.append((headers["x-gateway-provider"], headers["x-gateway-affinity"]))
    assert len({provider for provider, _ in seen}) == 1
    assert [kind for _, kind in seen] == ["miss"] + ["hit"] * 5


async def test_session_stickiness_and_new_session_spread(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A session sticks to its node; three new sessions land on three different nodes."""
    nodes = await three_nodes(start_simulator)
    config = settings_dict(
        {node.name: node.url for node in nodes},
        extra={"models": [{"name": TEST_MODEL, "stickiness": "session"}]},
    )
    server = await start_gateway(Settings.model_validate(config))
    first_nodes = []
    for session in ("s1", "s2", "s3"):
        _, headers, _ = await chat(server, chat_body(), headers={"x-session-id": session})
        assert headers["x-gateway-affinity"] == "miss"
        first_nodes.append(headers["x-gateway-provider"])
    assert sorted(first_nodes) == sorted(NAMES)
    for session, node in zip(("s1", "s2", "s3"), first_nodes, strict=True):
        for _ in range(2):
            body = chat_body(metadata={"session_id": session})
            _, headers, _ = await chat(server, body)
            assert headers["x-gateway-provider"] == node
            assert headers["x-gateway-affinity"] == "hit"


async def test_model_group_preference_outranks_the_shared_binding(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A key preferring a group is served there, and its binding moves into the group."""
    nodes = await three_nodes(start_simulator)
    config = settings_dict({node.name: node.url for node in nodes})
    config["groups"] = {"fast-lane": ["node-c"]}
    config["keys"][0]["model_group_preferences"] = {TEST_MODEL: "fast-lane"}
    server = await start_gateway(Settings.model_validate(config))
    for _ in range(3):
        status, headers, _ = await chat(server, chat_body())
        assert status == 200
        assert headers["x-gateway-provider"] == "node-c"


async def test_auto_model_resolves_by_mode_and_reports_the_model(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """The org's auto model picks by mode header, says which model it chose, and is listed."""
    node = await start_simulator("node-a")
    config = settings_dict({"node-a": node.url})
    config["orgs"] = [
        {
            "name": "acme",
            "auto_model": {
                "enabled": True,
                "fallback_model": TEST_MODEL,
                "routes": {"code": "other-model"},
            },
        }
    ]
    config["keys"][0]["org"] = "acme"
    server = await start_gateway(Settings.model_validate(config))
    body = {**chat_body(), "model": "auto"}
    _, headers, _ = await chat(server, body, headers={"x-gateway-mode": " Build "})
    assert headers["x-gateway-resolved-model"] == "other-model"
    seen = (await node.stats()).last_request()
    assert orjson.loads(seen.body)["model"] == "other"
    assert "x-gateway-mode" not in seen.headers
    _, headers, _ = await chat(server, body, headers={"x-gateway-mode": "unknown-mode"})
    assert headers["x-gateway-resolved-model"] == TEST_MODEL
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            server.make_url("/v1/models"), headers={"Authorization": f"Bearer {TEST_KEY}"}
        ) as response,
    ):
        listed = [model["id"] for model in (await response.json())["data"]]
    assert "auto" in listed


async def test_disabled_auto_model_is_a_clear_400(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Asking for an org's disabled auto model fails with a message that says so."""
    node = await start_simulator("node-a")
    config = settings_dict({"node-a": node.url})
    config["orgs"] = [
        {"name": "acme", "auto_model": {"enabled": False, "fallback_model": TEST_MODEL}}
    ]
    config["keys"][0]["org"] = "acme"
    config["keys"].append({"id": "no-org", "key_sha256": hash_key("sk-no-org")})
    server = await start_gateway(Settings.model_validate(config))
    status, _, body = await chat(server, {**chat_body(), "model": "auto"})
    assert status == 400
    assert body["error"]["code"] == "auto_model_disabled"
    assert "disabled" in body["error"]["message"]
    status, _, body = await chat(server, {**chat_body(), "model": "auto"}, key="sk-no-org")
    assert status == 404
    assert (await node.stats()).completion_requests == 0
