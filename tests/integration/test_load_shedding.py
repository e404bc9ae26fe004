"""A worker whose event loop cannot keep up answers new requests 503 + Retry-After at once,
counts them, keeps its health, metrics and admin endpoints answering, and recovers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping

import aiohttp
import orjson
from aiohttp.test_utils import TestServer

from gateway.app import RUNTIME
from gateway.config import Settings
from gateway.edge.overload import LoadShedder
from gateway.simulator.options import Timing
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import TEST_KEY, chat_body, settings_dict
from tests.support.polling import wait_until

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
ADMIN_TOKEN = "admin-token-for-the-shedding-test"
# Each turn of the hog holds the loop this long: every probe wakes at least this late.
HOG_SECONDS = 0.03


@contextlib.asynccontextmanager
async def slowed_loop() -> AsyncIterator[None]:
    """Make the event loop run late, as a CPU-bound worker's does, until the block ends."""
    stop = asyncio.Event()

    async def hog() -> None:
        while not stop.is_set():
            time.sleep(HOG_SECONDS)  # noqa: ASYNC251 - blocking the loop is the point
            await asyncio.sleep(0)

    task = asyncio.create_task(hog())
    try:
        yield
    finally:
        stop.set()
        await task


async def chat(server: TestServer) -> tuple[int, Mapping[str, str], bytes]:
    """One non-streamed chat request; its status, headers and body."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"), data=orjson.dumps(chat_body()), headers=AUTH
        ) as response,
    ):
        return response.status, response.headers, await response.read()


async def get(
    server: TestServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """One GET; its status and text."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url(path), headers=headers) as response,
    ):
        return response.status, await response.text()


def shedder_of(server: TestServer) -> LoadShedder:
    """The worker's load shedder."""
    shedder = server.app[RUNTIME].current.proxy.shedder
    assert shedder is not None
    return shedder


async def test_an_overloaded_worker_sheds_new_requests_promptly_and_recovers(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With the loop running late, new requests get an OpenAI-shaped 503 with Retry-After that
    is counted; /healthz, /readyz, /metrics and /admin/status still answer and show the
    overload; once the loop keeps up, requests are served again."""
    node = await start_simulator("node-a")
    settings = Settings.model_validate(
        settings_dict(
            {"node-a": node.url},
            extra={"server": {"admin_token": ADMIN_TOKEN, "load_shedding": True}},
        )
    )
    server = await start_gateway(settings)
    status, _, _ = await chat(server)
    assert status == 200
    shedder = shedder_of(server)
    assert not shedder.overloaded

    shed: list[tuple[int, Mapping[str, str], bytes]] = []

    async def refused() -> bool:
        answer = await chat(server)
        if answer[0] == 503:
            shed.append(answer)
        return bool(shed)

    async with slowed_loop():
        await wait_until(refused, timeout=30, message="a request shed with 503")
        status, headers, body = shed[0]
        assert headers["Retry-After"] == "1"
        assert headers["x-request-id"]
        error = orjson.loads(body)["error"]
        assert error["code"] == "overloaded"
        assert error["type"] == "service_unavailable_error"
        assert error["message"]
        assert shedder.overloaded
        assert shedder.shed >= 1
        assert (await get(server, "/healthz"))[0] == 200
        assert (await get(server, "/readyz"))[0] == 200
        status, metrics = await get(server, "/metrics")
        assert status == 200
        counted = next(
            line for line in metrics.splitlines() if line.startswith("gateway_requests_shed_total")
        )
        assert float(counted.split()[-1]) >= 1
        lag = next(
            line
            for line in metrics.splitlines()
            if line.startswith("gateway_event_loop_lag_seconds")
        )
        assert float(lag.split()[-1]) > settings.server.load_shedding_target_lag_ms / 1000
        status, page = await get(
            server, "/admin/status", {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        assert status == 200
        assert "overloaded: shedding" in page

    await wait_until(lambda: not shedder.overloaded, timeout=30, message="shedding to stop")
    status, _, _ = await chat(server)
    assert status == 200
    status, page = await get(server, "/admin/status", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert "keeping up" in page


async def test_a_request_admitted_before_the_overload_is_never_cut(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A stream that started before shedding began runs to its end while new requests are
    refused."""
    node = await start_simulator("node-a", timing=Timing(0, 0, 50, 64))
    settings = settings_dict({"node-a": node.url}, extra={"server": {"load_shedding": True}})
    server = await start_gateway(Settings.model_validate(settings))
    shedder = shedder_of(server)
    async with aiohttp.ClientSession() as session:
        body = orjson.dumps(chat_body(stream=True, max_tokens=200))
        async with session.post(
            server.make_url("/v1/chat/completions"), data=body, headers=AUTH
        ) as stream:
            assert stream.status == 200
            first = await stream.content.readline()
            assert first.startswith(b"data: ")
            async with slowed_loop():
                await wait_until(
                    lambda: shedder.overloaded, timeout=30, message="shedding to start"
                )
                assert not stream.content.at_eof()  # still streaming while new ones are shed
                rest = await stream.content.read()
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_with_load_shedding_off_nothing_is_shed(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """`server.load_shedding` is off by default: no shedder, and a late loop still serves every
    request."""
    node = await start_simulator("node-a")
    settings = Settings.model_validate(settings_dict({"node-a": node.url}))
    assert not settings.server.load_shedding
    server = await start_gateway(settings)
    assert server.app[RUNTIME].current.proxy.shedder is None
    async with slowed_loop():
        statuses = [(await chat(server))[0] for _ in range(10)]
    assert statuses == [200] * 10
