"""Request bodies: read whole within `max_body_bytes`, a deadline and the memory budget; compressed
ones refused by default, or decoded piece by piece within limits.

A body over `max_body_bytes` (declared or received) gets 413, one that is not all there within
the body-read deadline gets 408, and the connection closes after either. Each piece is counted in
the worker's memory budget before it is kept (a declared identity length at once, before any is
read); a refusal (503/429) closes the connection.

aiohttp's parser is told never to decode (`GuardedRequestHandler`), so no byte is inflated before
the handler has authenticated the request. With `server.request_compression: false` a body whose
`Content-Encoding` is not identity gets 415 unread; with `true`, gzip and deflate bodies are
decoded as they arrive, bounded by `max_body_bytes` decoded and by `MAX_RATIO` decoded bytes per
received byte, and the upstream receives the decoded bytes without the header.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway.dispatch.memory_budget import Reservation
from gateway.edge.connections import body_read_timeout, close_after_response
from gateway.edge.uploads import too_large
from gateway.shared.errors import GatewayError

# Decoders by `Content-Encoding` token: zlib's window bits for each container.
DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
IDENTITY = frozenset({"", "identity"})
# A body may decode to at most this many bytes per byte received (past the first `RATIO_FLOOR`
# decoded bytes): a legitimate JSON or form body compresses far less than a bomb does.
MAX_RATIO = 100
RATIO_FLOOR = 64 * 1024
# Inflate at most this much per step, so one small piece never allocates a large buffer at once.
STEP_BYTES = 64 * 1024


async def read_body(
    request: web.Request,
    memory: Reservation | None,
    *,
    max_body_bytes: int,
    request_compression: bool,
) -> bytes:
    """The whole body: 413 past `max_body_bytes`, 408 when it is not all there in time;
    each piece counted in the worker's memory budget before it is kept (a declared length
    at once, before any is read), 503/429 past it."""
    encoding = content_encoding(request.headers.get("Content-Encoding"))
    check_encoding(encoding, allowed=request_compression)
    length = request.content_length
    if length is not None and length > max_body_bytes:
        raise too_large(max_body_bytes)
    take = _taker(request, memory)
    if take is not None and encoding in IDENTITY and length is not None:
        take(length)
        take = None  # the declared length is held: the pieces are within it
    timeout = body_read_timeout(request)
    pieces = _pieces(request, max_body_bytes, take)
    try:
        if encoding in IDENTITY and request.content.is_eof():
            # The whole body came with the head: nothing to wait for, no deadline to arm.
            return await _gather(pieces)
        async with asyncio.timeout(timeout):
            if encoding in IDENTITY:
                return await _gather(pieces)
            return await decode_body(pieces, encoding, max_body_bytes, take)
    except web.HTTPRequestEntityTooLarge:
        raise too_large(max_body_bytes) from None
    except TimeoutError:
        # The rest of the body is not worth waiting for: close once the 408 is out.
        close_after_response(request)
        raise GatewayError(
            408,
            f"The request body did not arrive within {timeout:g} s.",
            "body_timeout",
            headers={"Connection": "close"},
        ) from None


async def _pieces(
    request: web.Request, limit: int, take: Callable[[int], None] | None
) -> AsyncIterator[bytes]:
    """The body as it arrives, undecoded: 413 past `limit` bytes received; each piece counted
    by `take` (the memory budget) before it is passed on."""
    received = 0
    async for piece in request.content.iter_any():
        received += len(piece)
        if received > limit:
            close_after_response(request)
            raise too_large(limit, close=True)
        if take is not None:
            take(len(piece))
        yield piece


async def _gather(pieces: AsyncIterator[bytes]) -> bytes:
    """A body's pieces, joined (one piece: as it came)."""
    gathered = [piece async for piece in pieces]
    return gathered[0] if len(gathered) == 1 else b"".join(gathered)


def _taker(request: web.Request, memory: Reservation | None) -> Callable[[int], None] | None:
    """Counts a request body's bytes in the memory budget; a refusal closes the connection (the
    rest of the body is not read)."""
    if memory is None:
        return None

    def take(size: int) -> None:
        try:
            memory.take_now("request_body", size)
        except GatewayError:
            close_after_response(request)
            raise

    return take


def content_encoding(header: str | None) -> str:
    """The body's single coding, lower-cased (`""` for none)."""
    return (header or "").strip().lower()


def check_encoding(encoding: str, *, allowed: bool) -> None:
    """Raise 415 for a coding the gateway will not decode (any, unless `allowed`)."""
    if encoding in IDENTITY:
        return
    if allowed and encoding in DECODERS:
        return
    supported = "gzip or deflate" if allowed else "identity only"
    raise GatewayError(
        415,
        f"Unsupported Content-Encoding `{encoding[:40]}` for a request body ({supported}).",
        "unsupported_content_encoding",
    )


async def decode_body(
    pieces: AsyncIterator[bytes],
    encoding: str,
    limit: int,
    take: Callable[[int], None] | None = None,
) -> bytes:
    """The decoded body of the compressed `pieces`: 413 past `limit` decoded bytes or past
    `MAX_RATIO`, 400 when the data is not valid for its coding; each decoded step counted by
    `take` (the memory budget) before it is kept."""
    decoder = zlib.decompressobj(DECODERS[encoding])
    decoded = bytearray()
    received = 0
    try:
        async for piece in pieces:
            received += len(piece)
            data = piece
            while data and not decoder.eof:
                step = decoder.decompress(data, STEP_BYTES)
                if take is not None:
                    take(len(step))
                decoded += step
                data = decoder.unconsumed_tail
                _check_size(len(decoded), received, limit)
            if decoder.eof and (decoder.unused_data or data):
                raise _invalid(encoding)
        decoded += decoder.flush()
    except zlib.error:
        raise _invalid(encoding) from None
    if not decoder.eof:
        raise _invalid(encoding)
    _check_size(len(decoded), received, limit)
    return bytes(decoded)


def _check_size(decoded: int, received: int, limit: int) -> None:
    if decoded > limit:
        raise GatewayError(
            413,
            f"The decoded request body is larger than the limit of {limit} bytes.",
            "body_too_large",
        )
    if decoded > RATIO_FLOOR and decoded > MAX_RATIO * received:
        raise GatewayError(
            413,
            f"The request body decodes to more than {MAX_RATIO} times its compressed size.",
            "compression_ratio_exceeded",
        )


def _invalid(encoding: str) -> GatewayError:
    return GatewayError(
        400, f"The request body is not valid {encoding} data.", "invalid_content_encoding"
    )
