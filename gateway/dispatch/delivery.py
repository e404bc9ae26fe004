"""Writing to the client within `routing.downstream_write_timeout_seconds`.

A client that accepts no bytes for that long (its socket buffer full, nothing read) is dropped:
its connection is aborted, so a stream's upstream is cancelled and its provider permit released,
and a buffered answer's memory is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Mapping

import aiohttp
from aiohttp import web

# More than an answer's head (status line and headers) takes.
HEAD_ALLOWANCE_BYTES = 16 * 1024
# A chunk's size line and its CRLF, at most.
CHUNK_FRAMING_BYTES = 32
# SO_LINGER on with a zero timeout: close sends a reset and drops unsent data.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class ClientStalledError(Exception):
    """The client accepted no bytes within the write deadline; its connection was aborted."""


# A whole answer past this size leaves in two writes, its head first (see `whole_answer`).
HEAD_FIRST_BYTES = 64 * 1024


class HeadFirstResponse(web.Response):
    """A whole answer whose head is written on its own, then its body as it is: aiohttp joins a
    held head and its body into one new buffer (on Python before 3.12.9), a second copy of a
    large answer for as long as the client takes to read it."""

    _send_headers_immediately = True


def whole_answer(status: int, body: bytes | bytearray, headers: Mapping[str, str]) -> web.Response:
    """The response for a whole answer: a large body is never copied on its way out."""
    kind = HeadFirstResponse if len(body) > HEAD_FIRST_BYTES else web.Response
    return kind(status=status, body=body, headers=headers)


class HeldHeadResponse(web.StreamResponse):
    """A streamed response whose head waits from `prepare` for its first bytes and goes out
    with them in one write (aiohttp's `Response` holds its head the same way)."""

    _send_headers_immediately = False


async def write_within(
    request: web.BaseRequest,
    response: web.StreamResponse,
    data: bytes,
    deadline: float,
    *,
    head: bool = False,
) -> None:
    """Write `data` to a started response, or drop the client and raise `ClientStalledError`;
    `head`: the response's held head goes out with it."""
    if _fits(request, len(data), head=head):
        # The transport takes it without pausing, so the write cannot wait on the client: no
        # deadline to arm (a stream's chunks mostly take this path).
        await response.write(data)
        return
    try:
        async with asyncio.timeout(deadline):
            await response.write(data)
    except TimeoutError:
        drop_client(request)
        raise ClientStalledError from None


async def write_last(
    request: web.BaseRequest,
    response: web.StreamResponse,
    data: bytes,
    deadline: float,
    *,
    head: bool = False,
) -> bool:
    """Write a started response's last bytes: with its end, in one write, when the transport
    takes them without pausing (True: the response is ended); else as `write_within` does
    (False: the response still needs its end)."""
    if _fits(request, len(data), head=head):
        await response.write_eof(data)
        return True
    await write_within(request, response, data, deadline, head=head)
    return False


async def deliver(request: web.BaseRequest, response: web.StreamResponse, deadline: float) -> bool:
    """Send a whole answer (one not started yet) now, within the deadline; False when the
    client stalled (and was dropped) or went away."""
    if response.prepared:
        return True
    try:
        if _cannot_wait(request, response):
            await response.prepare(request)
            await response.write_eof()
            return True
        async with asyncio.timeout(deadline):
            await response.prepare(request)
            await response.write_eof()
    except TimeoutError:
        drop_client(request)
        return False
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        return False
    return True


def _cannot_wait(request: web.BaseRequest, response: web.StreamResponse) -> bool:
    """Whether sending a whole answer cannot wait on the client, so needs no deadline: writing
    is not paused and the answer (with room for its head) fits in the transport's buffer below
    the mark where it would pause; the transport then takes it all at once."""
    body = response.body if isinstance(response, web.Response) else None
    if not isinstance(body, bytes | bytearray):
        return False
    return _fits(request, len(body), head=True)


def _fits(request: web.BaseRequest, size: int, *, head: bool) -> bool:
    """Whether `size` more bytes (with the answer's head, if `head`) go into the client's
    transport without pausing it: writing is not paused and they fit below the mark where it
    would pause."""
    transport = request.transport
    if transport is None or request.protocol.writing_paused:
        return False
    _, high = transport.get_write_buffer_limits()
    size += CHUNK_FRAMING_BYTES + (HEAD_ALLOWANCE_BYTES if head else 0)
    return transport.get_write_buffer_size() + size < high


def drop_client(request: web.BaseRequest) -> None:
    """Reset the client's connection: what is still buffered for it is discarded, not sent."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
    transport.abort()


def end_incomplete(request: web.BaseRequest) -> None:
    """End a started answer that cannot be completed: what is buffered is still sent, then the
    connection closes without the chunked encoding's end, so the client sees a broken transfer
    (an SSE reader the last event, an HTTP client an incomplete body), as it would directly."""
    transport = request.transport
    if transport is not None:
        transport.close()
