"""Compressed request bodies: refused by default, or decoded piece by piece within limits.

aiohttp's parser is told never to decode (`GuardedRequestHandler`), so no byte is inflated before
the handler has authenticated the request. With `server.request_compression: false` a body whose
`Content-Encoding` is not identity gets 415 unread; with `true`, gzip and deflate bodies are
decoded as they arrive, bounded by `max_body_bytes` decoded and by `MAX_RATIO` decoded bytes per
received byte, and the upstream receives the decoded bytes without the header.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator, Callable

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
