"""`gateway serve` as real processes: several workers on one port, and a graceful SIGTERM drain."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.launcher import GatewayProcess, free_port
from tests.support.gateway import TEST_KEY, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


@pytest.fixture
async def slow_node() -> AsyncIterator[SimulatorProcess]:
    """A simulator process generating 20 tokens per second."""
    async with SimulatorProcess(
        "node-a", ["--tokens-per-second", "20", "--base-ttft-ms", "0"]
    ) as node:
        yield node


async def healthz_pid(session: aiohttp.ClientSession, url: str) -> int | None:
    """The pid a fresh connection's /healthz reports, or None while nothing answers."""
    try:
        async with session.get(url + "/healthz", headers={"Connection": "close"}) as response:
            pid: int = (await response.json())["pid"]
            return pid
    except aiohttp.ClientConnectionError:
        return None


def config_for(node: SimulatorProcess, database_url: str) -> dict[str, Any]:
    """One provider and the test's database (the embedded default is covered by the demo test)."""
    return settings_dict({"node-a": node.url}, extra={"database": {"url": database_url}})


async def test_two_workers_answer_from_two_pids_on_one_port(
    slow_node: SimulatorProcess, database_url: str, tmp_path: Path
) -> None:
    """`--workers 2` gives two processes sharing the port; new connections reach both."""
    gateway = GatewayProcess(config_for(slow_node, database_url), tmp_path, workers=2)
    gateway.start()
    try:
        pids: set[int] = set()
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def both_seen() -> bool:
                pid = await healthz_pid(session, gateway.url)
                if pid is not None:
                    pids.add(pid)
                return len(pids) == 2

            await wait_until(both_seen, timeout=30, interval=0.01, message="two worker pids")
            async with session.post(
                gateway.url + "/v1/chat/completions",
                data=orjson.dumps(chat_body(max_tokens=2)),
                headers={"Authorization": f"Bearer {TEST_KEY}"},
            ) as response:
                assert response.status == 200
        assert gateway.process is not None
        assert gateway.process.pid not in pids
    finally:
        gateway.stop()
    assert gateway.wait(timeout=20) == 0, gateway.log()


async def test_ready_only_once_every_worker_listens(
    slow_node: SimulatorProcess, database_url: str, tmp_path: Path
) -> None:
    """`--workers 2`: /readyz answers 200 only once both workers listen, so the connections a
    load balancer sends as soon as it is ready reach both."""
    gateway = GatewayProcess(config_for(slow_node, database_url), tmp_path, workers=2)
    gateway.start()
    try:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def ready() -> bool:
                try:
                    async with session.get(gateway.url + "/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(ready, timeout=30, interval=0.01, message="/readyz 200")
            pids = {await healthz_pid(session, gateway.url) for _ in range(64)}
        # 64 fresh connections spread over two listening sockets by the kernel's hash: the
        # chance that all reach one of them is 2^-63.
        assert len(pids - {None}) == 2, pids
    finally:
        gateway.stop()
    assert gateway.wait(timeout=20) == 0, gateway.log()


async def test_sigterm_drains_in_flight_requests_then_stops_accepting(
    slow_node: SimulatorProcess, database_url: str, tmp_path: Path
) -> None:
    """A request in flight at SIGTERM completes; afterwards the port no longer accepts."""
    gateway = GatewayProcess(config_for(slow_node, database_url), tmp_path, workers=2)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:

            async def answers() -> bool:
                return await healthz_pid(session, gateway.url) is not None

            await wait_until(answers, timeout=30, message="gateway up")

            async def slow_request() -> tuple[int, bytes]:
                async with session.post(
                    gateway.url + "/v1/chat/completions",
                    data=orjson.dumps(chat_body(max_tokens=40)),
                    headers={"Authorization": f"Bearer {TEST_KEY}"},
                ) as response:
                    return response.status, await response.read()

            in_flight = asyncio.create_task(slow_request())
            await wait_until(
                lambda: _node_busy(slow_node), timeout=10, message="the request to be in flight"
            )
            gateway.terminate()
            status, body = await asyncio.wait_for(in_flight, timeout=30)
        assert status == 200
        assert orjson.loads(body)["choices"][0]["finish_reason"] == "length"
        assert await asyncio.to_thread(gateway.wait, 30) == 0
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", gateway.port)) != 0
        assert "worker_draining" in gateway.log()
    finally:
        gateway.stop()


async def _node_busy(node: SimulatorProcess) -> bool:
    return (await node.stats()).in_flight >= 1


async def test_one_scrape_sums_every_worker_and_metrics_can_have_their_own_port(
    slow_node: SimulatorProcess, database_url: str, tmp_path: Path
) -> None:
    """With two workers, one /metrics scrape (on server.metrics_port) counts all requests."""
    config = config_for(slow_node, database_url)
    metrics_port = free_port()
    config["server"]["metrics_port"] = metrics_port
    gateway = GatewayProcess(config, tmp_path, workers=2)
    gateway.start()
    try:
        pids: set[int] = set()
        sent = 0
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_until(
                lambda: _answers(session, gateway.url), timeout=30, message="gateway up"
            )
            while len(pids) < 2 or sent < 10:
                assert sent < 400, "new connections never reached the second worker"
                async with session.post(
                    gateway.url + "/v1/chat/completions",
                    data=orjson.dumps(chat_body(max_tokens=1)),
                    headers={"Authorization": f"Bearer {TEST_KEY}"},
                ) as response:
                    assert response.status == 200
                sent += 1
                pid = await healthz_pid(session, gateway.url)
                assert pid is not None
                pids.add(pid)
            async with session.get(gateway.url + "/metrics") as response:
                assert response.status == 404  # moved to its own port
            async with session.get(f"http://127.0.0.1:{metrics_port}/metrics") as response:
                assert response.status == 200
                text = await response.text()
    finally:
        gateway.stop()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    requests = families["gateway_requests"]
    total = sum(sample.value for sample in requests.samples if sample.name.endswith("_total"))
    assert total == sent
    assert TEST_KEY not in text


async def _answers(session: aiohttp.ClientSession, url: str) -> bool:
    return await healthz_pid(session, url) is not None
