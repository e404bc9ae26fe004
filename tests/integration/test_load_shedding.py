"""A worker whose requests queue behind its own work answers new ones 503 + Retry-After at once,
counts them, keeps its health, metrics and admin endpoints answering, never cuts an admitted
stream, and recovers. Served through the real connection layer (`GuardedSite`), where the
shedder's gate sits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway.app import create_app
from gateway.config import Settings
from gateway.edge.connections import ConnectionLimits
from gateway.edge.overload import LoadShedder
from gateway.edge.site import GuardedSite
from gateway.operations.app_keys import OVERLOAD_GATE, SETTINGS
from gateway.simulator.options import Timing
from tests.conftest import SimulatorFactory
from tests.support.gateway import TEST_KEY, chat_body, settings_dict
from tests.support.polling import wait_until

AUTH = {"Authorization": f"Bearer {TEST_KEY}"}
ADMIN_TOKEN = "admin-token-for-the-shedding-test"
# Each turn of the hog keeps the loop busy this long (CPU time): every request read meanwhile
# queues behind it, longer than a whole shedding interval.
HOG_SECONDS = 0.08
# A burst allowance well under a hog's turn, so requests that wait out turns are a standing queue.
TIGHT = {"load_shedding": True, "load_shedding_burst_seconds": 0.02}


class GuardedTestServer(TestServer):
    """A test server on the real connection layer: `GuardedSite` with the app's overload gate."""

    async def start_server(
        self, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any
    ) -> None:
        """Serve the app on a free loopback port."""
        self.runner = await self._make_runner(handler_cancellation=True, **kwargs)
        await self.runner.setup()
        app = self.app
        assert isinstance(app, web.Application)
        site = GuardedSite(
            self.runner,
            "127.0.0.1",
            0,
            limits=ConnectionLimits.from_settings(app[SETTINGS].server),
            admission=app[OVERLOAD_GATE],
        )
        await site.start()
        self.host, self.port, self.scheme = "127.0.0.1", site.port, "http"
        self._root = URL(f"http://127.0.0.1:{site.port}")


@contextlib.asynccontextmanager
async def guarded_gateway(settings: Settings) -> AsyncIterator[GuardedTestServer]:
    """The gateway app behind `GuardedTestServer`."""
    server = GuardedTestServer(create_app(settings))
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


@contextlib.asynccontextmanager
async def busy_loop() -> AsyncIterator[None]:
    """Keep the event loop busy with CPU work, as a worker past its capacity is, until the block
    ends."""
    stop = asyncio.Event()

    async def hog() -> None:
        while not stop.is_set():
            until = time.thread_time() + HOG_SECONDS
            while time.thread_time() < until:
                pass
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
    return server.app[OVERLOAD_GATE].shedder


def metric(text: str, name: str) -> float:
    """The value of an unlabelled sample on a /metrics page."""
    return float(next(line for line in text.splitlines() if line.startswith(name)).split()[-1])


async def test_a_worker_whose_requests_queue_sheds_them_promptly_and_recovers(
    start_simulator: SimulatorFactory,
) -> None:
    """With requests queueing behind the loop's work, new chat requests get an OpenAI-shaped
    503 with Retry-After that is counted; /healthz, /readyz, /metrics and /admin/status still
    answer and show the overload; once the loop keeps up, requests are served again."""
    node = await start_simulator("node-a")
    settings = Settings.model_validate(
        settings_dict(
            {"node-a": node.url},
            extra={"server": {"admin_token": ADMIN_TOKEN, **TIGHT}},
        )
    )
    async with guarded_gateway(settings) as server:
        status, _, _ = await chat(server)
        assert status == 200
        shedder = shedder_of(server)
        assert not shedder.overloaded
        shed: list[tuple[int, Mapping[str, str], bytes]] = []

        async def refused() -> bool:
            answer = await chat(server)
            if answer[0] == 503:
                shed.append(answer)
            return bool(shed) and shedder.overloaded

        async with busy_loop():
            await wait_until(refused, timeout=30, message="a request shed while overloaded")
            _, headers, body = shed[0]
            assert headers["Retry-After"] == "1"
            assert headers["x-request-id"]
            error = orjson.loads(body)["error"]
            assert (error["code"], error["type"]) == ("overloaded", "service_unavailable_error")
            assert error["message"]
            assert shedder.shed >= len(shed)
            assert (await get(server, "/healthz"))[0] == 200
            assert (await get(server, "/readyz"))[0] == 200
            status, metrics = await get(server, "/metrics")
            assert status == 200
            assert metric(metrics, "gateway_requests_shed_total") >= len(shed)

            async def page_shows_shedding() -> bool:
                status, page = await get(
                    server, "/admin/status", {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                )
                assert status == 200
                return "overloaded: shedding" in page

            # The state is re-judged every tenth of the (here 20 ms) allowance, so a window with
            # no late request ends it for a moment: the page shows it while it holds.
            await wait_until(
                page_shows_shedding, timeout=30, message="the status page showing the overload"
            )
        assert "gateway_queue_delay_seconds" in metrics

        await wait_until(lambda: not shedder.overloaded, timeout=30, message="the overload to end")
        status, _, _ = await chat(server)
        assert status == 200
        _, page = await get(server, "/admin/status", {"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert "keeping up" in page


async def test_a_request_admitted_before_the_overload_is_never_cut(
    start_simulator: SimulatorFactory,
) -> None:
    """A stream that started before the overload runs to its end while new requests are
    refused."""
    node = await start_simulator("node-a", timing=Timing(0, 0, 50, 64))
    settings = settings_dict({"node-a": node.url}, extra={"server": TIGHT})
    async with (
        guarded_gateway(Settings.model_validate(settings)) as server,
        aiohttp.ClientSession() as session,
    ):
        body = orjson.dumps(chat_body(stream=True, max_tokens=200))
        async with session.post(
            server.make_url("/v1/chat/completions"), data=body, headers=AUTH
        ) as stream:
            assert stream.status == 200
            first = await stream.content.readline()
            assert first.startswith(b"data: ")
            async with busy_loop():

                async def refused() -> bool:
                    return (await chat(server))[0] == 503

                await wait_until(refused, timeout=30, message="a new request shed")
                assert not stream.content.at_eof()  # still streaming while new ones are shed
                rest = await stream.content.read()
    assert rest.rstrip().endswith(b"data: [DONE]")


async def test_with_load_shedding_off_the_delay_is_measured_and_nothing_is_shed(
    start_simulator: SimulatorFactory,
) -> None:
    """With `server.load_shedding: false` a busy loop still serves every request, while the
    queueing delay is measured and published."""
    node = await start_simulator("node-a")
    config = settings_dict({"node-a": node.url}, extra={"server": {"load_shedding": False}})
    settings = Settings.model_validate(config)
    async with guarded_gateway(settings) as server:
        async with busy_loop():
            statuses = [(await chat(server))[0] for _ in range(10)]
        assert statuses == [200] * 10
        assert shedder_of(server).shed == 0
        _, metrics = await get(server, "/metrics")
        assert metric(metrics, "gateway_queue_delay_seconds") >= 0.0
        assert "gateway_queue_delay_seconds" in metrics
