"""Streamed writes: the held head leaves with the first bytes, the last bytes with the end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.dispatch.delivery import HeldHeadResponse, write_last, write_within

EVENT = b'data: {"id":"x"}\n\n'
DEADLINE = 5.0


def counting(request: web.BaseRequest) -> list[int]:
    """Count the transport's writes from now on (the sizes of what each call was handed)."""
    transport: Any = request.transport
    sizes: list[int] = []
    write, writelines = transport.write, transport.writelines

    def counted_write(data: bytes) -> None:
        sizes.append(len(data))
        write(data)

    def counted_writelines(chunks: list[bytes]) -> None:
        sizes.append(sum(len(chunk) for chunk in chunks))
        writelines(chunks)

    transport.write, transport.writelines = counted_write, counted_writelines
    return sizes


Handler = Callable[[web.Request], Any]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Any]]:
    """Start a real aiohttp server for one handler; yields a function that returns its port."""
    servers: list[TestServer] = []

    async def start(handler: Handler) -> int:
        app = web.Application()
        app.router.add_get("/", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        assert server.port is not None
        return server.port

    yield start
    for server in servers:
        await server.close()


async def fetch(port: int) -> bytes:
    """The raw bytes of one GET answer on a connection that closes after it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), DEADLINE)
    finally:
        writer.close()


def chunked_body(raw: bytes) -> bytes:
    """The decoded body of a chunked answer; fails unless it ends with the last chunk."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    body = b""
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n"
            return body
        body, rest = body + rest[:size], rest[size + 2 :]


async def held_stream(request: web.Request) -> tuple[HeldHeadResponse, list[int]]:
    """A prepared chunked event stream whose head is held, and the sizes of its transport's
    writes from before `prepare` on."""
    response = HeldHeadResponse(headers={"Content-Type": "text/event-stream"})
    response.enable_chunked_encoding()
    sizes = counting(request)
    await response.prepare(request)
    return response, sizes


async def test_a_one_chunk_stream_leaves_in_one_write(
    serve: Callable[[Handler], Any],
) -> None:
    """Head, the only chunk and the chunked end go out in one write, and parse as an answer."""
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        response, sizes = await held_stream(request)
        seen["after_prepare"] = list(sizes)
        seen["ended"] = await write_last(request, response, EVENT, DEADLINE, head=True)
        seen["writes"] = list(sizes)
        return response

    raw = await fetch(await serve(handler))
    assert seen["after_prepare"] == []  # the head waits for the first bytes
    assert seen["ended"] is True
    assert seen["writes"] == [len(raw)]
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert chunked_body(raw) == EVENT


async def test_the_head_leaves_with_the_first_chunk(serve: Callable[[Handler], Any]) -> None:
    """A longer stream: the head rides on the first chunk's write, the end on the last's."""
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        response, sizes = await held_stream(request)
        await write_within(request, response, EVENT, DEADLINE, head=True)
        await write_within(request, response, EVENT, DEADLINE)
        seen["ended"] = await write_last(request, response, EVENT, DEADLINE)
        seen["writes"] = list(sizes)
        return response

    raw = await fetch(await serve(handler))
    assert seen["ended"] is True
    assert len(seen["writes"]) == 3
    assert sum(seen["writes"]) == len(raw)
    assert chunked_body(raw) == EVENT * 3


async def test_last_bytes_past_the_high_water_mark_leave_the_end_to_the_caller(
    serve: Callable[[Handler], Any],
) -> None:
    """Last bytes that would pause the transport are written as any chunk; the end follows."""
    large = b"data: " + b"x" * (512 * 1024) + b"\n\n"
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        response, _ = await held_stream(request)
        seen["ended"] = await write_last(request, response, large, DEADLINE, head=True)
        await response.write_eof()
        return response

    raw = await fetch(await serve(handler))
    assert seen["ended"] is False
    assert chunked_body(raw) == large
