"""Transcription uploads are streamed through: the upstream gets the form while the client is
still sending it, only the model field changes, a failed attempt is replayed on the next
provider from the kept copy, and size limits and disconnects behave as for any body."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.launcher import free_port
from gateway.edge.uploads import live_uploads
from tests.conftest import GatewayFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, UPSTREAM_MODEL, build_settings
from tests.support.polling import wait_until

MIB = 1024 * 1024
BOUNDARY = "upload-boundary-7f3a"
PATH = "/v1/audio/transcriptions"
AUDIO = bytes(range(256)) * (8 * MIB // 256)  # 8 MiB, every byte value, in order


def form_head(model: str) -> bytes:
    """The form up to the file's bytes: the model field first, as the OpenAI SDK sends it."""
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\n{model}\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()


FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def expected_upstream_body() -> bytes:
    """What the node must receive: the client's bytes with only the model id mapped."""
    return form_head(UPSTREAM_MODEL) + AUDIO + FORM_TAIL


class Upstream:
    """A real aiohttp server standing in for a transcription node; records what it received.

    With `fail_after`, it answers 503 once that many bytes arrived (the rest unread); with
    `drop_after`, it drops the connection instead."""

    def __init__(self, fail_after: int | None = None, drop_after: int | None = None) -> None:
        self.received = 0
        self.bodies: list[bytes] = []
        self.aborted = False
        self._fail_after = fail_after
        self._drop_after = drop_after

    async def handle(self, request: web.Request) -> web.Response:
        """Read the body as it comes; answer with its size."""
        body = bytearray()
        try:
            while chunk := await request.content.readany():
                body += chunk
                self.received += len(chunk)
                if self._fail_after is not None and len(body) >= self._fail_after:
                    return web.json_response({"error": {"message": "busy"}}, status=503)
                if self._drop_after is not None and len(body) >= self._drop_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return web.Response()
        except BaseException:
            self.aborted = True
            raise
        self.bodies.append(bytes(body))
        return web.json_response({"text": f"{len(body)} bytes"})

    async def start(self, stack: AsyncExitStack) -> str:
        """Serve on a free loopback port until the stack closes; the URL."""
        app = web.Application(client_max_size=64 * MIB)
        app.router.add_post(PATH, self.handle)
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        stack.push_async_callback(server.close)
        return str(server.make_url("")).rstrip("/")


async def post_form(
    gateway: TestServer, pieces: AsyncIterator[bytes]
) -> tuple[int, dict[str, object]]:
    """Post a form written by `pieces` (chunked, no Content-Length); status and JSON answer."""
    headers = {
        "Authorization": f"Bearer {TEST_KEY}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(gateway.make_url(PATH), data=pieces, headers=headers) as response,
    ):
        return response.status, await response.json()


async def start(
    start_gateway: GatewayFactory, upstreams: dict[str, str], max_body_bytes: int = 16 * MIB
) -> TestServer:
    """A gateway in front of `upstreams` (tried in order) that takes bodies up to the limit."""
    extra = {"server": {"max_body_bytes": max_body_bytes}}
    return await start_gateway(build_settings(upstreams, extra=extra))


async def test_a_large_upload_reaches_the_upstream_while_the_client_is_still_sending(
    start_gateway: GatewayFactory, exit_stack: AsyncExitStack
) -> None:
    """8 MiB written in 1 MiB pieces: the client waits, half way, until the node has over 2 MiB
    of it (which cannot happen if the gateway waits for the whole body); the node then gets
    the form byte for byte with only the model id mapped."""
    upstream = Upstream()
    gateway = await start(start_gateway, {"node-a": await upstream.start(exit_stack)})

    async def pieces() -> AsyncIterator[bytes]:
        yield form_head(TEST_MODEL)
        for index in range(8):
            yield AUDIO[index * MIB : (index + 1) * MIB]
            if index == 3:
                await wait_until(
                    lambda: upstream.received > 2 * MIB,
                    timeout=10,
                    message="the node receiving the upload before the client finished it",
                )
        yield FORM_TAIL

    status, answer = await post_form(gateway, pieces())
    assert status == 200
    assert answer == {"text": f"{len(expected_upstream_body())} bytes"}
    assert upstream.bodies == [expected_upstream_body()]


async def test_a_connect_failure_replays_the_upload_on_the_next_provider(
    start_gateway: GatewayFactory, exit_stack: AsyncExitStack
) -> None:
    """The first provider refuses connections: the whole upload reaches the second, unchanged,
    and the failed attempt is counted against the first."""
    upstream = Upstream()
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = await start(start_gateway, {"dead": dead, "node-b": await upstream.start(exit_stack)})

    async def pieces() -> AsyncIterator[bytes]:
        yield form_head(TEST_MODEL)
        for index in range(8):
            yield AUDIO[index * MIB : (index + 1) * MIB]
        yield FORM_TAIL

    status, _ = await post_form(gateway, pieces())
    assert status == 200
    assert upstream.bodies == [expected_upstream_body()]
    async with aiohttp.ClientSession() as session:
        text = await (await session.get(gateway.make_url("/metrics"))).text()
    assert 'gateway_upstream_attempts_total{outcome="connect_error",provider="dead"} 1.0' in text


async def test_an_upstream_failure_mid_upload_replays_the_kept_copy(
    start_gateway: GatewayFactory, exit_stack: AsyncExitStack
) -> None:
    """The first node reads 1 MiB of the upload, then answers 503: the second gets the whole
    form (the bytes already sent from the kept copy, the rest as it arrives)."""
    busy = Upstream(fail_after=MIB)
    upstream = Upstream()
    urls = {"busy": await busy.start(exit_stack), "node-b": await upstream.start(exit_stack)}
    gateway = await start(start_gateway, urls)

    async def pieces() -> AsyncIterator[bytes]:
        yield form_head(TEST_MODEL)
        for index in range(8):
            yield AUDIO[index * MIB : (index + 1) * MIB]
            if index == 1:
                await wait_until(lambda: busy.received >= MIB, message="the busy node reading")
        yield FORM_TAIL

    status, _ = await post_form(gateway, pieces())
    assert status == 200
    assert busy.received >= MIB
    assert upstream.bodies == [expected_upstream_body()]


async def test_an_upload_past_max_body_bytes_is_413_and_the_upstream_is_let_go(
    start_gateway: GatewayFactory, exit_stack: AsyncExitStack
) -> None:
    """A chunked upload that grows past `server.max_body_bytes` answers 413 `body_too_large`;
    the node's half-received request is cut off, and the node is not blamed."""
    upstream = Upstream()
    gateway = await start(start_gateway, {"node-a": await upstream.start(exit_stack)}, MIB)

    async def pieces() -> AsyncIterator[bytes]:
        yield form_head(TEST_MODEL)
        for index in range(4):
            yield AUDIO[index * MIB // 2 : (index + 1) * MIB // 2]

    status, answer = await post_form(gateway, pieces())
    assert status == 413
    assert answer["error"]["code"] == "body_too_large"  # type: ignore[index]
    await wait_until(lambda: upstream.aborted, message="the node's request being cut off")
    assert upstream.bodies == []


async def test_a_client_leaving_mid_upload_cancels_the_upstream_request(
    start_gateway: GatewayFactory, exit_stack: AsyncExitStack
) -> None:
    """A client that goes away half way through its upload: the node's request is cut off too."""
    upstream = Upstream()
    gateway = await start(start_gateway, {"node-a": await upstream.start(exit_stack)})

    async def pieces() -> AsyncIterator[bytes]:
        yield form_head(TEST_MODEL)
        yield AUDIO[:MIB]
        await asyncio.Event().wait()  # never finishes: the client is cancelled here

    sending = asyncio.create_task(post_form(gateway, pieces()))
    await wait_until(lambda: upstream.received > MIB // 2, message="the node receiving the upload")
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    await wait_until(lambda: upstream.aborted, message="the node's request being cut off")
    assert upstream.bodies == []


async def test_past_the_replay_cap_a_failed_upload_is_not_replayed(
    start_gateway: GatewayFactory, exit_stack: AsyncExitStack
) -> None:
    """A 40 MiB upload whose first node fails after 33 MiB (past the 32 MiB kept copy) is not
    replayed: the client gets that node's 503, and the second node is never asked."""
    busy = Upstream(fail_after=33 * MIB)
    upstream = Upstream()
    urls = {"busy": await busy.start(exit_stack), "node-b": await upstream.start(exit_stack)}
    gateway = await start(start_gateway, urls, max_body_bytes=64 * MIB)

    async def pieces() -> AsyncIterator[bytes]:
        yield form_head(TEST_MODEL)
        for _ in range(5):
            for index in range(8):
                yield AUDIO[index * MIB : (index + 1) * MIB]
        yield FORM_TAIL

    status, _ = await post_form(gateway, pieces())
    assert status == 503
    assert busy.received >= 33 * MIB
    assert upstream.received == 0


async def test_a_slow_upload_is_not_the_upstream_timing_out(
    start_gateway: GatewayFactory, exit_stack: AsyncExitStack
) -> None:
    """An upload that takes longer than `response_timeout_seconds` to send, but never pauses that
    long, is answered: the answer's limit counts from the upload's end."""
    upstream = Upstream()
    extra = {"routing": {"response_timeout_seconds": 0.3}}
    url = await upstream.start(exit_stack)
    gateway = await start_gateway(build_settings({"node-a": url}, extra=extra))

    async def pieces() -> AsyncIterator[bytes]:
        yield form_head(TEST_MODEL)
        for index in range(8):
            # The client's own pace (the scenario, not a wait for a condition): 8 x 0.1 s.
            await asyncio.sleep(0.1)
            yield AUDIO[index * 1024 : (index + 1) * 1024]
        yield FORM_TAIL

    status, answer = await post_form(gateway, pieces())
    assert status == 200, answer
    assert upstream.bodies == [form_head(UPSTREAM_MODEL) + AUDIO[: 8 * 1024] + FORM_TAIL]


@pytest.fixture
def no_collection() -> Iterator[None]:
    """The cyclic garbage collector off (what is left before is collected first): an object
    that outlives its request only through a reference cycle stays, as it would for seconds
    in a worker whose collections come late."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_collection")
@pytest.mark.parametrize("failure", ["drop", "busy", "dead", "none"])
async def test_an_upload_is_let_go_with_its_request_without_a_collection(
    start_gateway: GatewayFactory, exit_stack: AsyncExitStack, failure: str
) -> None:
    """Every provider drops the connection mid-upload, answers 503, or refuses it, or the first
    answers: once the client has its answer the upload's source (its copy, the request it reads)
    is gone, freed by reference counting alone. A failed attempt's exception must not keep its
    frames, and their upload, in a cycle."""
    upstreams: dict[str, str] = {}
    for name in ("node-a", "node-b"):
        if failure == "dead":
            upstreams[name] = f"http://127.0.0.1:{free_port()}"
            continue
        upstream = {
            "drop": Upstream(drop_after=MIB),
            "busy": Upstream(fail_after=MIB),
            "none": Upstream(),
        }[failure]
        upstreams[name] = await upstream.start(exit_stack)
    gateway = await start(start_gateway, upstreams)

    async def pieces() -> AsyncIterator[bytes]:
        yield form_head(TEST_MODEL)
        for index in range(4):
            yield AUDIO[index * MIB : (index + 1) * MIB]
        yield FORM_TAIL

    status, _ = await post_form(gateway, pieces())
    assert status == {"drop": 502, "busy": 503, "dead": 503, "none": 200}[failure]
    await asyncio.sleep(0)  # the handler's last step (its `finally`) has run
    assert live_uploads() == 0
