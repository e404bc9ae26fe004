"""A provider marked `draining: true` by reload, under load: nothing fails, its keys move."""

from __future__ import annotations

import asyncio
import copy
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest

from bench.launcher import PROJECT_ROOT, GatewayProcess
from gateway.config_fleet import hash_key
from tests.support.gateway import TEST_MODEL, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess
from tests.support.traffic import Traffic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
KEYS = [f"sk-drain-test-key-{index:02d}-7d1c0e5b9a" for index in range(8)]


@pytest.fixture
async def nodes() -> AsyncIterator[list[SimulatorProcess]]:
    """Three simulator processes at 100 tokens per second."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                SimulatorProcess(name, ["--tokens-per-second", "100", "--base-ttft-ms", "5"])
            )
            for name in ("node-a", "node-b", "node-c")
        ]


def bindings(gateway: GatewayProcess) -> dict[str, str]:
    """`gateway bindings` for the test model: key id → provider."""
    listed = subprocess.run(
        [sys.executable, "-m", "gateway", "bindings", "--config", str(gateway.config_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=PROJECT_ROOT,
        timeout=60,
    )
    rows = [line.split() for line in listed.stdout.splitlines()[1:]]
    return {row[0]: row[2] for row in rows if row[1] == TEST_MODEL and row[0].startswith("user-")}


async def _ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url + "/readyz", headers={"Connection": "close"}) as response:
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def test_draining_a_provider_under_load_fails_nothing_and_moves_its_keys(
    nodes: list[SimulatorProcess], database_url: str, tmp_path: Path
) -> None:
    """8 keys stream and not over three nodes; node-a is set draining by reload: 0 failed, no
    request starts there afterwards, its in-flight ones finish, and no binding stays on it."""
    config = settings_dict(
        {node.name: node.url for node in nodes}, extra={"database": {"url": database_url}}
    )
    config["keys"] += [
        {"id": f"user-{index}", "key_sha256": hash_key(key), "models": ["*"]}
        for index, key in enumerate(KEYS)
    ]
    gateway = GatewayProcess(config, tmp_path, workers=2)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: _ready(session, gateway.url), timeout=30, message="ready")
        async with Traffic(gateway.url, KEYS, clients=2, max_tokens=24) as traffic:

            def node_a_busy() -> bool:
                return any(o.provider == "node-a" for o in traffic.outcomes[-20:])

            await wait_until(lambda: traffic.sent() >= 60, timeout=60, message="warm load")
            await wait_until(node_a_busy, timeout=30, message="keys bound to node-a")
            assert "node-a" in set((await _bindings_async(gateway)).values())

            drained = copy.deepcopy(config)
            drained["providers"][0]["draining"] = True
            gateway.write_config(drained)
            gateway.reload()
            await wait_until(
                lambda: len(gateway.events("config_reloaded")) == 2,
                timeout=10,
                message="both workers to reload",
            )
            applied_at = time.monotonic()
            sent_at_reload = traffic.sent()
            await wait_until(
                lambda: traffic.sent() >= sent_at_reload + 120,
                timeout=60,
                message="load after the drain",
            )
        after = await _bindings_async(gateway)
    finally:
        gateway.stop()
    assert traffic.failed() == [], traffic.failed()[:5]
    assert {outcome.stream for outcome in traffic.outcomes} == {True, False}
    late = [o for o in traffic.outcomes if o.started > applied_at and o.provider == "node-a"]
    assert late == []
    finished_there = [o for o in traffic.outcomes if o.provider == "node-a"]
    assert finished_there  # it served before the drain, and its last requests finished
    assert len(after) == len(KEYS)
    assert "node-a" not in set(after.values())
    assert [event["draining"] for event in gateway.events("config_reloaded")] == [["node-a"]] * 2


async def _bindings_async(gateway: GatewayProcess) -> dict[str, str]:
    return await asyncio.to_thread(bindings, gateway)
