"""A real `gateway serve` worker that gets too little CPU sheds new requests with a prompt
OpenAI-shaped 503 + Retry-After, still answers its health endpoints, and recovers."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict

from tests.support.gateway import TEST_KEY, GatewayProcess, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
# The worker is stopped this long, then runs this long, over and over: each of its lag probes
# (a 5 ms sleep) spans a stop, as when a worker gets a small share of a busy core.
STOPPED_SECONDS = 0.06
RUNNING_SECONDS = 0.003


@pytest.fixture
async def node() -> AsyncIterator[SimulatorProcess]:
    """An instant simulator process."""
    async with SimulatorProcess("node-a", ["--base-ttft-ms", "0"]) as simulator:
        yield simulator


@contextmanager
def starved(pid: int) -> Iterator[None]:
    """Give the process only a sliver of CPU time (SIGSTOP/SIGCONT) until the block ends."""
    done = threading.Event()

    def throttle() -> None:
        while not done.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(STOPPED_SECONDS)
            os.kill(pid, signal.SIGCONT)
            time.sleep(RUNNING_SECONDS)

    thread = threading.Thread(target=throttle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        os.kill(pid, signal.SIGCONT)


async def worker_pid(session: aiohttp.ClientSession, url: str) -> int | None:
    """The worker's pid from /healthz, or None while nothing answers."""
    try:
        async with session.get(url + "/healthz") as response:
            pid: int = (await response.json())["pid"]
            return pid
    except aiohttp.ClientConnectionError:
        return None


async def test_a_starved_worker_sheds_with_503_and_retry_after_and_recovers(
    node: SimulatorProcess, database_url: str, tmp_path: Path
) -> None:
    """Overloaded, the worker answers new chat requests 503 `overloaded` with Retry-After while
    /healthz and /readyz answer 200; the shed count is on /metrics; once it has its CPU back,
    requests are served again."""
    config = settings_dict(
        {"node-a": node.url},
        extra={"database": {"url": database_url}, "server": {"load_shedding": True}},
    )
    gateway = GatewayProcess(config, tmp_path, workers=1)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:

            async def up() -> bool:
                return await worker_pid(session, gateway.url) is not None

            await wait_until(up, timeout=30, message="gateway up")
            pid = await worker_pid(session, gateway.url)
            assert pid is not None
            shed: list[tuple[int, CIMultiDict[str], bytes]] = []

            async def chat() -> tuple[int, CIMultiDict[str], bytes]:
                async with session.post(
                    gateway.url + "/v1/chat/completions",
                    data=orjson.dumps(chat_body()),
                    headers=AUTH,
                ) as response:
                    return response.status, CIMultiDict(response.headers), await response.read()

            async def refused() -> bool:
                answers = await asyncio.gather(*(chat() for _ in range(4)))
                shed.extend(answer for answer in answers if answer[0] == 503)
                return bool(shed)

            assert (await chat())[0] == 200
            with starved(pid):
                await wait_until(refused, timeout=60, interval=0.05, message="a 503 shed")
                async with session.get(gateway.url + "/healthz") as health:
                    assert health.status == 200
                async with session.get(gateway.url + "/readyz") as ready:
                    assert ready.status == 200
            _, headers, body = shed[0]
            assert headers["Retry-After"] == "1"
            assert headers["x-request-id"]
            error = orjson.loads(body)["error"]
            assert (error["code"], error["type"]) == ("overloaded", "service_unavailable_error")
            async with session.get(gateway.url + "/metrics") as metrics:
                text = await metrics.text()
            counted = [
                float(line.split()[-1])
                for line in text.splitlines()
                if line.startswith("gateway_requests_shed_total")
            ]
            assert counted
            assert counted[0] >= len(shed)

            async def served() -> bool:
                return (await chat())[0] == 200

            await wait_until(served, timeout=30, interval=0.1, message="serving again")
    finally:
        gateway.stop()
