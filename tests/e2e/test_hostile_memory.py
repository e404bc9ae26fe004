"""CPU and memory exhaustion as attacks on a real `gateway serve` (one worker): a body of a
million keys, stalled bodies and uploads from one key, aborted uploads, answers nobody reads."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.launcher import GatewayProcess
from tests.e2e.test_hostile_clients import start_gateway_process
from tests.support.gateway import (
    OTHER_KEY,
    TEST_KEY,
    TEST_MODEL,
    UPSTREAM_MODEL,
    chat_body,
    settings_dict,
)
from tests.support.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MIB = 1024 * 1024
BUDGET = 256 * MIB
# The attack's bodies: just under the default `max_body_bytes`, their last bytes never sent.
DECLARED_BYTES = 10_000_000
SENT_BYTES = 9_990_000
ATTACKERS = 48
BOUNDARY = "hostile-boundary"
# How long /healthz may take while the worker handles the million-key body: it is parsed in the
# helper process (the worker spends ~30 ms counting and handing it over); parsed in the worker,
# /healthz waited 0.4-0.7 s (the model splice of old: seconds).
HEALTHZ_WITHIN = 0.3

GatewayFactory = Callable[..., Awaitable[GatewayProcess]]


class FakeUpstream:
    """A real upstream that reads each body piece by piece and keeps none of it: chat answers a
    small completion (noting whether the body named the upstream model), a transcription answers
    once the form has all come in; with `abort_uploads` it drops the connection after 1 MiB."""

    def __init__(self, *, abort_uploads: bool = False) -> None:
        self.abort_uploads = abort_uploads
        self.spliced: list[bool] = []
        self.answer_padding = 0

    async def chat(self, request: web.Request) -> web.Response:
        """Read the body (kept only long enough to look for the model) and answer."""
        body = await request.read()
        self.spliced.append(b'"model":"%s"' % UPSTREAM_MODEL.encode() in body[:4096] + body[-4096:])
        answer = {"id": "c", "object": "chat.completion", "model": UPSTREAM_MODEL, "choices": []}
        if self.answer_padding:
            answer["padding"] = "x" * self.answer_padding
        return web.json_response(answer)

    async def transcription(self, request: web.Request) -> web.StreamResponse:
        """Read the form and drop it; answer, or abort after 1 MiB."""
        received = 0
        async for piece in request.content.iter_any():
            received += len(piece)
            if self.abort_uploads and received > MIB:
                assert request.transport is not None
                request.transport.abort()
                return web.Response()
        return web.json_response({"text": f"{received} bytes"})


@pytest.fixture
async def upstream(exit_stack: AsyncExitStack) -> tuple[FakeUpstream, str]:
    """The fake upstream, served on loopback; with its URL."""
    fake = FakeUpstream()
    app = web.Application(client_max_size=64 * MIB)
    app.router.add_post("/v1/chat/completions", fake.chat)
    app.router.add_post("/v1/audio/transcriptions", fake.transcription)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    exit_stack.push_async_callback(server.close)
    return fake, str(server.make_url("")).rstrip("/")


@pytest.fixture
async def gateway_factory(
    upstream: tuple[FakeUpstream, str], database_url: str, tmp_path: Path
) -> AsyncIterator[GatewayFactory]:
    """Start `gateway serve` (one worker) before the fake upstream with `server` settings."""
    started: list[GatewayProcess] = []

    async def start(**server: Any) -> GatewayProcess:
        config = settings_dict(
            {"node-a": upstream[1]},
            extra={
                "database": {"url": database_url},
                "server": {"body_read_timeout_seconds": 120, **server},
                "routing": {"response_timeout_seconds": 60},
            },
        )
        gateway = await start_gateway_process(config, tmp_path)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def worker_of(gateway: GatewayProcess) -> psutil.Process:
    """The single worker's process (`--workers 1` serves in the process itself)."""
    assert gateway.process is not None
    return psutil.Process(gateway.process.pid)


async def chat(url: str, key: str = TEST_KEY, model: str = TEST_MODEL) -> int:
    """One small chat completion on a fresh connection; its status."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/chat/completions",
            data=orjson.dumps(chat_body(model=model)),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        ) as response,
    ):
        await response.read()
        return response.status


async def test_a_body_of_a_million_keys_leaves_the_worker_answering(
    gateway_factory: GatewayFactory, upstream: tuple[FakeUpstream, str]
) -> None:
    """An 8 MB chat body with 1.4 M top-level keys, for a model whose upstream id differs: the
    upstream gets it with only the model spliced, and /healthz answers all along, each within
    0.3 s (the body is parsed in the helper process; parsed in the worker, 0.4-0.7 s)."""
    fake, _ = upstream
    gateway = await gateway_factory(max_body_bytes=16 * MIB)
    filler = b",".join(b'"%x":1' % index for index in range(1_400_000))
    body = orjson.dumps(chat_body())[:-1] + b"," + filler + b"}"
    slowest = 0.0
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(
            session.post(
                gateway.url + "/v1/chat/completions",
                data=body,
                headers={"Authorization": f"Bearer {TEST_KEY}"},
            )
        )
        while not request.done():
            started = time.monotonic()
            async with session.get(gateway.url + "/healthz") as health:
                assert health.status == 200
            slowest = max(slowest, time.monotonic() - started)
        async with await request as answer:
            assert answer.status == 200, await answer.text()
    print(f"million keys: {len(body) / MIB:.1f} MiB, slowest /healthz {slowest * 1000:.0f} ms")
    assert fake.spliced == [True]
    assert slowest < HEALTHZ_WITHIN


def stalled_json_head(key: str) -> bytes:
    """A chat request head declaring DECLARED_BYTES, and the first SENT_BYTES of its body."""
    opening = b'{"model":"%s","messages":[{"role":"user","content":"' % TEST_MODEL.encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {DECLARED_BYTES}\r\n\r\n"
    ).encode()
    return head + opening + b"x" * (SENT_BYTES - len(opening))


def stalled_upload_head(key: str) -> bytes:
    """A transcription form declaring DECLARED_BYTES: its model field, then SENT_BYTES of file."""
    form = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{TEST_MODEL}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    head = (
        "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {key}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
        f"Content-Length: {DECLARED_BYTES}\r\n\r\n"
    ).encode()
    return head + form + b"\0" * (SENT_BYTES - len(form))


async def send_and_stall(
    port: int, data: bytes
) -> tuple[asyncio.StreamWriter, asyncio.Task[bytes]]:
    """Open a connection, send `data` (as much as the gateway takes) and keep it open; with the
    task reading whatever the gateway answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.create_task(reader.read(4096))
    writer.write(data)
    # Refused and closed before it all went: the rest is not sent.
    with contextlib.suppress(ConnectionError, TimeoutError):
        await asyncio.wait_for(writer.drain(), 30)
    return writer, answer


async def test_stalled_bodies_and_uploads_of_one_key_stay_within_the_memory_budget(
    gateway_factory: GatewayFactory,
) -> None:
    """48 stalled 10 MB chat bodies and 48 stalled 10 MB uploads from one key, budget 256 MiB:
    the worker's RSS stays within the budget over its baseline, the key gets 429
    `key_memory_share` past its half, and another key is still served."""
    gateway = await gateway_factory(
        max_body_bytes=10 * MIB, memory_budget_bytes=BUDGET, memory_share_per_key=0.5
    )
    worker = worker_of(gateway)
    assert await chat(gateway.url) == 200
    baseline = worker.memory_info().rss
    peak = baseline
    stalled: list[tuple[asyncio.StreamWriter, asyncio.Task[bytes]]] = []
    try:
        for make in (stalled_json_head, stalled_upload_head):
            for _ in range(ATTACKERS):
                stalled.append(await send_and_stall(gateway.port, make(TEST_KEY)))
                peak = max(peak, worker.memory_info().rss)
        assert await chat(gateway.url, OTHER_KEY, "other-model") == 200
        peak = max(peak, worker.memory_info().rss)
        refused = [answer.result() for _, answer in stalled if answer.done()]
    finally:
        for writer, answer in stalled:
            answer.cancel()
            writer.close()
    print(
        f"stalled bodies: RSS {baseline / MIB:.0f} -> peak {peak / MIB:.0f} MiB, "
        f"{len(refused)} of {len(stalled)} refused; first: {refused[:1]!r}"
    )
    assert any(b" 429 " in answer and b"key_memory_share" in answer for answer in refused)
    assert peak - baseline < BUDGET


# The goal: RSS back within 10 % of its baseline 10 s after the traffic stops. The
# worker trims the allocator once the requests' memory is given back (gateway/dispatch/
# allocator.py); without the trims glibc kept 1-13 MiB of what they freed 10 s on, and before the
# cycle fixes the 8 uploads' copies (72 MiB) stayed referenced.
SETTLED_WITHIN = 0.10


async def live_uploads(url: str) -> float:
    """`gateway_memory_live_uploads` from the worker's /metrics."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("gateway_memory_live_uploads "):
            return float(line.split()[1])
    raise AssertionError("no gateway_memory_live_uploads in /metrics")


async def test_aborted_uploads_leave_no_memory_behind(
    gateway_factory: GatewayFactory, upstream: tuple[FakeUpstream, str]
) -> None:
    """Eight 9 MB uploads whose upstream drops each after 1 MiB: once they are answered no
    upload object is left in memory (no reference cycle waiting for a collection), and within
    10 s the worker's RSS is back within 10 % of its baseline (their copies: 72 MiB)."""
    fake, _ = upstream
    fake.abort_uploads = True
    gateway = await gateway_factory(max_body_bytes=16 * MIB)
    worker = worker_of(gateway)
    assert await chat(gateway.url) == 200
    audio = b"\0" * (9 * MIB)

    async def upload() -> int:
        form = aiohttp.FormData()
        form.add_field("model", TEST_MODEL)
        form.add_field("file", audio, filename="a.wav")
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                gateway.url + "/v1/audio/transcriptions",
                data=form,
                headers={"Authorization": f"Bearer {TEST_KEY}"},
            ) as response,
        ):
            await response.read()
            return response.status

    # One aborted upload first: what that path allocates once (code, the error path's objects)
    # belongs to the baseline, not to the traffic's residue.
    await asyncio.gather(upload(), return_exceptions=True)
    baseline = worker.memory_info().rss
    statuses = await asyncio.gather(*(upload() for _ in range(8)), return_exceptions=True)
    assert all(status in (502, 503) or isinstance(status, Exception) for status in statuses)
    peak = worker.memory_info().rss

    async def settled() -> bool:
        return worker.memory_info().rss <= baseline * (1 + SETTLED_WITHIN)

    async def none_live() -> bool:
        return await live_uploads(gateway.url) == 0

    try:
        await wait_until(settled, timeout=10, interval=0.25, message="RSS back near its baseline")
        # Gone with their requests, not at some later collection (the gauge is fresh by now: the
        # allocator's trim runs on the gauges' refresh after the copies are given back).
        await wait_until(none_live, timeout=5, interval=0.25, message="no upload object left")
    finally:
        print(
            f"aborted uploads: RSS {baseline / MIB:.0f} -> {peak / MIB:.0f} -> "
            f"{worker.memory_info().rss / MIB:.0f} MiB, "
            f"live uploads {await live_uploads(gateway.url)}"
        )
