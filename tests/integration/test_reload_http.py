"""Reload in one worker, through its real HTTP server: snapshots, carried-over state, refusals."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from gateway.config import Settings
from gateway.operations.app_keys import RELOADER, RUNTIME
from gateway.simulator import Timing
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import OTHER_KEY, TEST_KEY, chat_body, settings_dict
from tests.support.polling import wait_until

ADMIN = "admin-token-added-by-reload"


def write(path: Path, config: dict[str, Any]) -> Path:
    """A config file with this content."""
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def test_a_stream_in_flight_finishes_with_the_snapshot_it_started_with(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Its key is removed mid-stream: the stream finishes whole; the key's next request is 401."""
    node = await start_simulator(
        "node-a", timing=Timing(base_ttft_ms=0, per_token_ms=0, tokens_per_second=50)
    )
    config = settings_dict({"node-a": node.url})
    server = await start_gateway(Settings.model_validate(config))
    without_key = {**config, "keys": config["keys"][1:]}
    path = write(tmp_path / "gateway.yaml", without_key)
    async with aiohttp.ClientSession() as session:

        async def stream() -> bytes:
            async with session.post(
                server.make_url("/v1/chat/completions"),
                data=orjson.dumps(chat_body(max_tokens=30, stream=True)),
                headers={"Authorization": f"Bearer {TEST_KEY}"},
            ) as response:
                assert response.status == 200
                return await response.read()

        in_flight = asyncio.create_task(stream())
        await wait_until(lambda: _started(node), message="the stream to start")
        outcome = server.app[RELOADER].reload(path)
        assert outcome.result == "applied"
        async with session.post(
            server.make_url("/v1/chat/completions"),
            data=orjson.dumps(chat_body(max_tokens=1)),
            headers={"Authorization": f"Bearer {TEST_KEY}"},
        ) as response:
            assert response.status == 401
        body = await asyncio.wait_for(in_flight, timeout=30)
    assert body.rstrip().endswith(b"data: [DONE]")
    assert b'"error"' not in body


async def _started(node: Any) -> bool:
    return bool((await node.stats()).in_flight)


async def test_learnt_state_survives_a_reload_and_new_settings_apply(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Cooldowns and latency samples of providers that stay carry over; an added admin token
    opens /admin/status, which shows the new config's digest."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b")]
    config = settings_dict({node.name: node.url for node in nodes})
    server = await start_gateway(Settings.model_validate(config))
    before = server.app[RUNTIME].current
    before.router.health.rate_limited("node-b", 60)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/chat/completions"),
            data=orjson.dumps(chat_body(max_tokens=1)),
            headers={"Authorization": f"Bearer {TEST_KEY}"},
        ) as response:
            assert response.status == 200
            assert response.headers["x-gateway-provider"] == "node-a"
        async with session.get(server.make_url("/admin/status")) as response:
            assert response.status == 404  # no admin token yet
        changed = {**config, "server": {**config["server"], "admin_token": ADMIN}}
        changed["providers"][0]["max_concurrency"] = 7
        outcome = server.app[RELOADER].reload(write(tmp_path / "gateway.yaml", changed))
        after = server.app[RUNTIME].current
        async with session.get(
            server.make_url("/admin/status"), headers={"Authorization": f"Bearer {ADMIN}"}
        ) as response:
            assert response.status == 200
            page = await response.text()
    assert outcome.result == "applied"
    assert after is not before
    assert after.digest != before.digest
    assert f'title="{after.digest}"' in page
    assert after.router.health.cooling("node-b")
    assert after.router.latency is before.router.latency
    assert after.catalog.providers["node-a"].max_concurrency == 7


async def test_an_invalid_config_is_refused_and_the_running_one_keeps_serving(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Every problem is reported at once; the runtime is unchanged and still answers."""
    node = await start_simulator("node-a")
    config = settings_dict({node.name: node.url})
    server = await start_gateway(Settings.model_validate(config))
    running = server.app[RUNTIME].current
    broken = {**config, "keys": [*config["keys"], {"id": "team-a", "key_sha256": "nope"}]}
    broken["routing"] = {**config["routing"], "failover_budget": 0}
    outcome = server.app[RELOADER].reload(write(tmp_path / "gateway.yaml", broken))
    missing = server.app[RELOADER].reload(tmp_path / "absent.yaml")
    assert outcome.result == "invalid"
    assert any(error.startswith("keys[2].key_sha256") for error in outcome.errors)
    assert any(error.startswith("routing.failover_budget") for error in outcome.errors)
    assert missing.result == "invalid"
    assert server.app[RUNTIME].current is running
    async with aiohttp.ClientSession() as session:
        for key in (TEST_KEY, OTHER_KEY):
            async with session.post(
                server.make_url("/v1/chat/completions"),
                data=orjson.dumps(chat_body(max_tokens=1, model="other-model")),
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                assert response.status == 200
