"""A real `gateway serve` worker hit by a burst it cannot start at once sheds the requests that
queued too long with a prompt OpenAI-shaped 503 + Retry-After, serves the rest, still answers
its health endpoints, and serves again after; clients that resend at once are served, not
answered with refusals."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from tests.support.gateway import (
    PROJECT_ROOT,
    TEST_KEY,
    GatewayProcess,
    chat_body,
    free_port,
    settings_dict,
)
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
# Requests that arrive at one worker at once, on as many connections: far more work than the
# worker starts within a shedding interval.
BURST = 600
# A tight policy, so the burst's queue is well past it.
SHEDDING = {
    "load_shedding": True,
    "load_shedding_target_delay_ms": 2,
    "load_shedding_interval_ms": 20,
}


@pytest.fixture
async def node() -> AsyncIterator[SimulatorProcess]:
    """An instant simulator process."""
    async with SimulatorProcess("node-a", ["--base-ttft-ms", "0"]) as simulator:
        yield simulator


# Connections of the closed loop, each resending the moment it is answered, for this long.
LOOP_CONNECTIONS = 128
LOOP_SECONDS = 3.0


@pytest.fixture
async def fast_node() -> AsyncIterator[str]:
    """The bench's fast upstream (canned answers, no framework) in its own process: far
    cheaper per request than a gateway worker, so the worker is what a closed loop saturates."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.fast_upstream", "--port", str(port),
        cwd=PROJECT_ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def listening() -> bool:
                try:
                    async with session.get(url + "/metrics") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(listening, timeout=30, message="fast upstream up")
        yield url
    finally:
        process.terminate()
        await process.wait()


def raw_request(*, close: bool = True) -> bytes:
    """One chat request; `close` asks the server to close the connection after its answer."""
    body = orjson.dumps(chat_body())
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: gateway",
        f"Authorization: Bearer {TEST_KEY}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *(["Connection: close"] if close else []),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def chat(session: aiohttp.ClientSession, url: str) -> int:
    """The status of one chat request to the gateway at `url`."""
    async with session.post(
        url + "/v1/chat/completions", data=orjson.dumps(chat_body()), headers=AUTH
    ) as response:
        await response.read()
        return response.status


async def serving(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether the gateway at `url` answers a chat request 200 (False while it is not up)."""
    try:
        return await chat(session, url) == 200
    except aiohttp.ClientConnectionError:
        return False


def samples(metrics: str, name: str) -> list[float]:
    """The values of a metric's samples in a /metrics page."""
    return [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name)]


async def burst(url: str) -> list[tuple[int, dict[str, str], bytes]]:
    """Open `BURST` connections, then send a request on each at once; every answer."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    connections = [await asyncio.open_connection(parts.hostname, parts.port) for _ in range(BURST)]
    request = raw_request()
    for _, writer in connections:
        writer.write(request)

    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[int, dict[str, str], bytes]:
        raw = await reader.read()
        writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, payload

    async with asyncio.timeout(60):
        return await asyncio.gather(*(answer(reader, writer) for reader, writer in connections))


async def test_a_burst_past_what_a_worker_can_start_is_partly_shed_with_503_and_retry_after(
    node: SimulatorProcess, database_url: str, tmp_path: Path
) -> None:
    """Of a burst that queues past the policy, the worker answers some requests 503
    `overloaded` with Retry-After (counted on /metrics) and serves the others; /healthz and
    /readyz answer 200; afterwards requests are served again."""
    config = settings_dict(
        {"node-a": node.url}, extra={"database": {"url": database_url}, "server": SHEDDING}
    )
    gateway = GatewayProcess(config, tmp_path, workers=1)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(
                lambda: serving(session, gateway.url), timeout=30, message="gateway up"
            )
            answers = await burst(gateway.url)
            statuses = [status for status, _, _ in answers]
            shed = [answer for answer in answers if answer[0] == 503]
            assert shed, statuses
            assert set(statuses) == {200, 503}
            _, headers, body = shed[0]
            assert headers["retry-after"] == "1"
            assert headers["x-request-id"]
            error = orjson.loads(body)["error"]
            assert (error["code"], error["type"]) == ("overloaded", "service_unavailable_error")
            async with session.get(gateway.url + "/healthz") as health:
                assert health.status == 200
            async with session.get(gateway.url + "/readyz") as ready:
                assert ready.status == 200
            async with session.get(gateway.url + "/metrics") as metrics:
                text = await metrics.text()
            assert samples(text, "gateway_requests_shed_total") == [len(shed)]

            async def served() -> bool:
                return await chat(session, gateway.url) == 200

            await wait_until(served, timeout=30, interval=0.1, message="serving again")
    finally:
        gateway.stop()


async def closed_loop(url: str) -> list[int]:
    """`LOOP_CONNECTIONS` keep-alive connections, each sending its next request the moment the
    last is answered (503 included) for `LOOP_SECONDS`; every status."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    request = raw_request(close=False)
    statuses: list[int] = []
    deadline = asyncio.get_running_loop().time() + LOOP_SECONDS

    async def client() -> None:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while asyncio.get_running_loop().time() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in lines
                    if line.lower().startswith("content-length:")
                )
                await reader.readexactly(length)
                statuses.append(int(lines[0].split()[1]))
        finally:
            writer.close()

    async with asyncio.timeout(LOOP_SECONDS + 60):
        await asyncio.gather(*(client() for _ in range(LOOP_CONNECTIONS)))
    return statuses


async def test_clients_that_resend_at_once_are_served_rather_than_refused(
    fast_node: str, database_url: str, tmp_path: Path
) -> None:
    """A closed loop of connections that resend at once keeps the worker past its target
    whatever is refused: after a few intervals of refusals the worker rests them (counted on
    /metrics), so the loop gets mostly answers, not mostly refusals."""
    config = settings_dict(
        {"node-a": fast_node}, extra={"database": {"url": database_url}, "server": SHEDDING}
    )
    gateway = GatewayProcess(config, tmp_path, workers=1)
    gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until(
                lambda: serving(session, gateway.url), timeout=30, message="gateway up"
            )
            statuses = await closed_loop(gateway.url)
            async with session.get(gateway.url + "/metrics") as metrics:
                text = await metrics.text()
        answered, refused = statuses.count(200), statuses.count(503)
        assert answered + refused == len(statuses), set(statuses)
        rests = samples(text, "gateway_shedding_rests_total")
        assert rests
        assert rests[0] >= 1
        assert refused > 0
        assert answered > 2 * refused, (answered, refused)
    finally:
        gateway.stop()
