"""Live reload of `gateway serve` under load: key rotation, refused configs, restart-only fields."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.launcher import PROJECT_ROOT, GatewayProcess
from gateway.config_fleet import hash_key
from tests.support.gateway import TEST_KEY, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess
from tests.support.traffic import Traffic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

KEY_B = "sk-rotation-key-b-4f1e0c9a7d3b2e6f"
KEY_C = "sk-rotation-key-c-8a2d4c6e0f1b3a5c"
ADMIN_TOKEN = "admin-token-for-reload-tests"
UPSTREAM_SECRET = "upstream-secret-never-logged-5c1d"
DIGEST = re.compile(r'id="config-digest" title="([0-9a-f]{64})"')


@pytest.fixture
async def nodes() -> AsyncIterator[list[SimulatorProcess]]:
    """Two simulator processes streaming at 200 tokens per second."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                SimulatorProcess(name, ["--tokens-per-second", "200", "--base-ttft-ms", "5"])
            )
            for name in ("node-a", "node-b")
        ]


def base_config(nodes: list[SimulatorProcess], database_url: str) -> dict[str, Any]:
    """Key A (team-a) and key B, both nodes, the test's database and an admin token."""
    config = settings_dict(
        {node.name: node.url for node in nodes},
        extra={
            "database": {"url": database_url},
            "server": {"admin_token": ADMIN_TOKEN},
        },
    )
    config["keys"].append({"id": "key-b", "key_sha256": hash_key(KEY_B), "models": ["*"]})
    return config


async def status_of(session: aiohttp.ClientSession, url: str, key: str) -> int:
    """The status of one small chat completion on a fresh connection."""
    async with session.post(
        url + "/v1/chat/completions",
        data=orjson.dumps(chat_body(max_tokens=1)),
        headers={"Authorization": f"Bearer {key}", "Connection": "close"},
    ) as response:
        await response.read()
        return response.status


async def digests(session: aiohttp.ClientSession, url: str, rounds: int = 12) -> set[str]:
    """The config digests /admin/status shows over fresh connections (reaching both workers)."""
    seen = set()
    for _ in range(rounds):
        async with session.get(
            url + "/admin/status",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Connection": "close"},
        ) as response:
            match = DIGEST.search(await response.text())
            assert match is not None
            seen.add(match.group(1))
    return seen


async def reload_counts(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """gateway_config_reloads_total by result, summed over the workers."""
    async with session.get(url + "/metrics") as response:
        text = await response.text()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "gateway_config_reloads":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["result"]] = sample.value
    return counts


def gateway_reload(pid_file: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """`gateway reload --pid-file FILE [...]` as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", "reload", "--pid-file", str(pid_file), *arguments],
        capture_output=True,
        text=True,
        check=False,
        cwd=PROJECT_ROOT,
        timeout=30,
    )


async def test_rotation_under_load_and_a_refused_config(
    nodes: list[SimulatorProcess], database_url: str, tmp_path: Path
) -> None:
    """4 clients stream on key A while B is removed and C added: A never fails, C works and B
    gets 401 within 2 s; an invalid config is refused with every error logged and C still works."""
    config = base_config(nodes, database_url)
    gateway = GatewayProcess(config, tmp_path, workers=2)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(
                lambda: _ready(session, gateway.url), timeout=30, message="gateway ready"
            )
            assert await status_of(session, gateway.url, KEY_B) == 200
            assert await status_of(session, gateway.url, KEY_C) == 401
            before = await digests(session, gateway.url)
            assert len(before) == 1

            async with Traffic(gateway.url, [TEST_KEY], clients=4, stream=True) as traffic:
                await wait_until(lambda: traffic.sent() >= 20, timeout=30, message="warm load")

                rotated = copy.deepcopy(config)
                rotated["keys"] = [key for key in rotated["keys"] if key["id"] != "key-b"] + [
                    {"id": "key-c", "key_sha256": hash_key(KEY_C), "models": ["*"]}
                ]
                rotated["server"]["workers"] = 3  # restart-only: reported, not applied
                gateway.write_config(rotated)
                sent_before = traffic.sent()
                result = gateway_reload(gateway.pid_file, "--config", str(gateway.config_path))
                assert result.returncode == 0, result.stderr

                async def rotated_everywhere() -> bool:
                    if len(gateway.events("config_reloaded")) < 2:
                        return False
                    statuses = [await status_of(session, gateway.url, KEY_B) for _ in range(4)]
                    statuses += [await status_of(session, gateway.url, KEY_C) for _ in range(4)]
                    return statuses == [401] * 4 + [200] * 4

                await wait_until(
                    rotated_everywhere, timeout=2.0, message="B refused and C served everywhere"
                )
                needed = gateway.events("config_restart_needed")
                assert needed
                assert all(event["fields"] == ["server.workers"] for event in needed)
                after = await digests(session, gateway.url)
                assert len(after) == 1
                assert after != before

                invalid = copy.deepcopy(rotated)
                invalid["providers"].append(
                    {"name": "broken", "url": "not a url", "api_key": UPSTREAM_SECRET, "models": {}}
                )
                invalid["keys"][0]["route"] = {"strategy": "fixed", "fixed": "nowhere"}
                gateway.write_config(invalid)
                refused = gateway_reload(gateway.pid_file, "--config", str(gateway.config_path))
                assert refused.returncode == 1
                assert "providers[2].url" in refused.stderr
                gateway.reload()  # the signal itself, as an operator without the CLI sends it
                await wait_until(
                    lambda: len(gateway.events("config_reload_refused")) >= 3,
                    timeout=10,
                    message="supervisor and both workers to refuse the invalid config",
                )
                for _ in range(4):
                    assert await status_of(session, gateway.url, KEY_C) == 200
                await wait_until(
                    lambda: traffic.sent() >= sent_before + 40,
                    timeout=30,
                    message="load across both reloads",
                )
            counts = await reload_counts(session, gateway.url)
            assert await digests(session, gateway.url) == after
    finally:
        gateway.stop()
    assert traffic.failed() == [], traffic.failed()[:5]
    assert all(outcome.stream for outcome in traffic.outcomes)
    for event in gateway.events("config_reload_refused"):
        errors = " | ".join(event["errors"])
        assert "providers[2].url" in errors
        assert "providers[2].models" in errors
        assert "keys[0].route.fixed: unknown provider 'nowhere'" in errors
    # One count per worker and reload; `failed` appears only if a valid config failed to build.
    assert (counts["applied"], counts["invalid"], counts.get("failed", 0.0)) == (2.0, 2.0, 0.0)
    log = gateway.log()
    assert UPSTREAM_SECRET not in log
    assert KEY_B not in log
    assert KEY_C not in log


async def _ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url + "/readyz", headers={"Connection": "close"}) as response:
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


async def test_sighup_while_starting_is_applied_not_fatal(
    nodes: list[SimulatorProcess], database_url: str, tmp_path: Path
) -> None:
    """A SIGHUP that arrives as `gateway serve` starts is held, then applied: nothing dies."""
    config = base_config(nodes, database_url)
    gateway = GatewayProcess(config, tmp_path, workers=1)
    gateway.start()
    try:
        await wait_until(gateway.pid_file.exists, timeout=20, message="the pid file")
        gateway.reload()
        async with aiohttp.ClientSession() as session:
            await wait_until(
                lambda: _ready(session, gateway.url), timeout=30, message="gateway ready"
            )
            await wait_until(
                lambda: len(gateway.events("config_reloaded")) == 1,
                timeout=10,
                message="the held reload to be applied",
            )
            assert await status_of(session, gateway.url, TEST_KEY) == 200
        assert gateway.process is not None
        assert gateway.process.poll() is None
    finally:
        gateway.stop()
    assert gateway.wait(timeout=20) == 0
    assert not gateway.pid_file.exists()


async def test_removed_provider_gets_no_new_requests(
    nodes: list[SimulatorProcess], database_url: str, tmp_path: Path
) -> None:
    """A provider removed by reload gets no new request; its keys move to the one left."""
    config = base_config(nodes, database_url)
    gateway = GatewayProcess(config, tmp_path, workers=1)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(
                lambda: _ready(session, gateway.url), timeout=30, message="gateway ready"
            )
            async with Traffic(gateway.url, [TEST_KEY, KEY_B], clients=2) as traffic:
                await wait_until(lambda: traffic.sent() >= 20, timeout=30, message="warm load")
                smaller = copy.deepcopy(config)
                smaller["providers"] = [p for p in smaller["providers"] if p["name"] != "node-a"]
                gateway.write_config(smaller)
                gateway.reload()
                await wait_until(
                    lambda: len(gateway.events("config_reloaded")) == 1,
                    timeout=10,
                    message="the reload",
                )
                applied_at = time.monotonic()
                await wait_until(
                    lambda: _idle(nodes[0]), timeout=30, message="node-a's in-flight to finish"
                )
                settled = (await nodes[0].stats()).completed
                await wait_until(
                    lambda: traffic.sent() >= 60, timeout=30, message="load after the reload"
                )
        node_a_after = (await nodes[0].stats()).completed
    finally:
        gateway.stop()
    assert traffic.failed() == [], traffic.failed()[:5]
    late = [o for o in traffic.outcomes if o.started > applied_at and o.provider == "node-a"]
    assert late == []
    assert node_a_after == settled  # only requests already in flight finished there


async def _idle(node: SimulatorProcess) -> bool:
    return (await node.stats()).in_flight == 0
