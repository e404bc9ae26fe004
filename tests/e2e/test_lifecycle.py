"""Process lifecycle: lame-duck SIGTERM, workers that die with (and are restarted by) their
supervisor, and a rolling restart behind a real nginx under load."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest

from bench.launcher import GatewayProcess
from bench.nginx import running_nginx
from tests.support.gateway import TEST_KEY, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess
from tests.support.traffic import Traffic

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
DRAIN_DELAY_SECONDS = 2.0


@pytest.fixture
async def nodes() -> AsyncIterator[list[SimulatorProcess]]:
    """Two simulator processes at 100 tokens per second."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(
                SimulatorProcess(name, ["--tokens-per-second", "100", "--base-ttft-ms", "5"])
            )
            for name in ("node-a", "node-b")
        ]


def config_for(nodes: list[SimulatorProcess], database_url: str) -> dict[str, Any]:
    """Both nodes, the test's database and a short drain delay."""
    return settings_dict(
        {node.name: node.url for node in nodes},
        extra={
            "database": {"url": database_url},
            "server": {"drain_delay_seconds": DRAIN_DELAY_SECONDS, "shutdown_timeout_seconds": 20},
        },
    )


async def ready(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether /readyz answers 200 on a fresh connection."""
    try:
        async with session.get(url + "/readyz", headers={"Connection": "close"}) as response:
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


def workers_of(gateway: GatewayProcess) -> list[psutil.Process]:
    """The supervisor's worker processes."""
    assert gateway.process is not None
    found = []
    for child in psutil.Process(gateway.process.pid).children():
        if alive(child) and "resource_tracker" not in " ".join(child.cmdline()):
            found.append(child)
    return found


def alive(process: psutil.Process) -> bool:
    """Running and not a zombie waiting to be reaped."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def test_sigterm_is_a_lame_duck_then_drains(
    nodes: list[SimulatorProcess], database_url: str, tmp_path: Path
) -> None:
    """After SIGTERM: /readyz fails and answers close their connection for the drain delay,
    requests are still served, a stream in flight finishes, then the port stops accepting."""
    gateway = GatewayProcess(config_for(nodes, database_url), tmp_path, workers=2)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: ready(session, gateway.url), timeout=30, message="ready")
            await wait_until(
                lambda: len(gateway.events("worker_started")) == 2,
                timeout=30,
                message="both workers started",
            )

            async def long_stream() -> bytes:
                async with session.post(
                    gateway.url + "/v1/chat/completions",
                    data=orjson.dumps(chat_body(max_tokens=300, stream=True)),
                    headers={"Authorization": f"Bearer {TEST_KEY}"},
                ) as response:
                    assert response.status == 200
                    return await response.read()

            stream = asyncio.create_task(long_stream())
            await wait_until(lambda: _busy(nodes), timeout=10, message="the stream in flight")
            signalled_at = time.monotonic()
            gateway.terminate()
            await wait_until(
                lambda: len(gateway.events("worker_draining")) == 2,
                timeout=10,
                message="both workers draining",
            )
            async with session.get(gateway.url + "/readyz") as response:
                body = await response.json()
                assert response.status == 503
                assert "draining" in body["reason"]
                assert response.headers["Connection"] == "close"
            async with session.post(
                gateway.url + "/v1/chat/completions",
                data=orjson.dumps(chat_body(max_tokens=2)),
                headers={"Authorization": f"Bearer {TEST_KEY}"},
            ) as response:
                assert response.status == 200
                assert response.headers["Connection"] == "close"
            answered_within_delay = time.monotonic() - signalled_at < DRAIN_DELAY_SECONDS
            events = await asyncio.wait_for(stream, timeout=60)
        assert await asyncio.to_thread(gateway.wait, 60) == 0, gateway.log()
    finally:
        gateway.stop()
    assert answered_within_delay  # the checks above ran inside the drain delay
    assert events.rstrip().endswith(b"data: [DONE]")
    assert b'"error"' not in events
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", gateway.port)) != 0


async def _busy(nodes: list[SimulatorProcess]) -> bool:
    return any([(await node.stats()).in_flight >= 1 for node in nodes])


async def test_workers_die_with_a_killed_supervisor(
    nodes: list[SimulatorProcess], database_url: str, tmp_path: Path
) -> None:
    """SIGKILL of the supervisor: its workers are gone within a second."""
    gateway = GatewayProcess(config_for(nodes, database_url), tmp_path, workers=2)
    gateway.start()
    workers: list[psutil.Process] = []
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: ready(session, gateway.url), timeout=30, message="ready")
        await wait_until(
            lambda: len(gateway.events("worker_started")) == 2, timeout=30, message="2 workers"
        )
        workers = workers_of(gateway)
        assert len(workers) == 2
        assert gateway.process is not None
        gateway.process.kill()
        gateway.process.wait(timeout=5)
        await wait_until(
            lambda: not any(alive(worker) for worker in workers),
            timeout=1.0,
            message="the orphaned workers to exit",
        )
    finally:
        for worker in workers:
            if worker.is_running():
                worker.kill()
        gateway.stop()
    # (The port is not probed here: on a machine shared with other test runs, a freed port can
    # be someone else's a moment later. The workers that held it are gone, which is the point.)


async def test_supervisor_restarts_a_dead_worker(
    nodes: list[SimulatorProcess], database_url: str, tmp_path: Path
) -> None:
    """A worker killed with SIGKILL is replaced; the new one serves on the same port."""
    gateway = GatewayProcess(config_for(nodes, database_url), tmp_path, workers=2)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: ready(session, gateway.url), timeout=30, message="ready")
            await wait_until(lambda: len(workers_of(gateway)) == 2, timeout=10, message="workers")
            victim = workers_of(gateway)[0]
            os.kill(victim.pid, signal.SIGKILL)

            def replaced() -> bool:
                pids = {worker.pid for worker in workers_of(gateway)}
                return len(pids) == 2 and victim.pid not in pids

            await wait_until(replaced, timeout=20, message="a replacement worker")
            replacement = next(w.pid for w in workers_of(gateway) if w.pid != victim.pid)
            pids: set[int] = set()

            async def both_answer() -> bool:
                async with session.get(
                    gateway.url + "/healthz", headers={"Connection": "close"}
                ) as response:
                    pids.add((await response.json())["pid"])
                return len(pids & {w.pid for w in workers_of(gateway)}) == 2

            await wait_until(both_answer, timeout=30, message="both workers answering")
        assert victim.pid not in pids
        assert len(gateway.events("worker_restarted")) == 1
        assert replacement in {w.pid for w in workers_of(gateway)}
    finally:
        gateway.stop()


async def test_rolling_restart_behind_nginx_fails_no_request(
    nodes: list[SimulatorProcess], database_url: str, tmp_path: Path
) -> None:
    """Three `gateway serve` behind nginx (keep-alive upstreams), each SIGTERM'd and started again
    in turn under load from 12 clients, streamed and not: zero failed requests."""
    config = config_for(nodes, database_url)
    gateways = []
    for index in range(3):
        directory = tmp_path / f"gateway-{index}"
        directory.mkdir()
        gateways.append(GatewayProcess(config, directory, workers=2))
    try:
        for gateway in gateways:
            gateway.start()
        async with aiohttp.ClientSession() as session:
            for gateway in gateways:
                await wait_until(partial(ready, session, gateway.url), timeout=60, message="up")
            # nginx drops an idle upstream connection before a gateway's drain delay ends.
            with running_nginx(
                tmp_path / "nginx", [g.port for g in gateways], upstream_idle_seconds=1.0
            ) as front:
                async with Traffic(front, [TEST_KEY], clients=12, max_tokens=12) as traffic:
                    await wait_until(lambda: traffic.sent() >= 50, timeout=60, message="warm")
                    for gateway in gateways:
                        gateway.terminate()
                        assert await asyncio.to_thread(gateway.wait, 60) == 0, gateway.log()
                        served = len(gateway.events("request"))
                        gateway.start()
                        await wait_until(
                            partial(ready, session, gateway.url), timeout=60, message="back"
                        )
                        # In turn: the next stops once nginx sends this one traffic again.
                        await wait_until(
                            partial(_serves_more, gateway, served),
                            timeout=60,
                            interval=0.2,
                            message="nginx to use the restarted gateway",
                        )
                        await wait_until(
                            partial(_sent_at_least, traffic, traffic.sent() + 50),
                            timeout=60,
                            message="load after the restart",
                        )
    finally:
        for gateway in gateways:
            gateway.stop()
    failed = traffic.failed()
    assert failed == [], f"{len(failed)} of {traffic.sent()} failed: {failed[:5]}"
    assert {outcome.stream for outcome in traffic.outcomes} == {True, False}
    assert traffic.sent() >= 200


def _sent_at_least(traffic: Traffic, count: int) -> bool:
    return traffic.sent() >= count


async def test_a_body_still_arriving_when_the_listener_closes_is_served(
    nodes: list[SimulatorProcess], database_url: str, tmp_path: Path
) -> None:
    """A request whose body is still arriving when the drain delay ends is answered in full:
    shutdown waits for the body (aiohttp ignores bytes once its shutdown begins)."""
    gateway = GatewayProcess(config_for(nodes, database_url), tmp_path, workers=1)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(lambda: ready(session, gateway.url), timeout=30, message="ready")
        body = orjson.dumps(chat_body(max_tokens=2))
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
            f"Authorization: Bearer {TEST_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body[:10])
        await writer.drain()
        gateway.terminate()
        await wait_until(
            lambda: not _accepts(gateway.port), timeout=10, message="the listener to close"
        )
        writer.write(body[10:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout=30)
        writer.close()
        assert await asyncio.to_thread(gateway.wait, 30) == 0
    finally:
        gateway.stop()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK", answer[:300]
    assert b"connection: close" in rest.lower()
    assert b'"choices"' in rest


def _accepts(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _serves_more(gateway: GatewayProcess, count: int) -> bool:
    return len(gateway.events("request")) > count
