"""The upstream side: one client session per worker, header hygiene, and what one attempt sends."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.catalog import Provider
from gateway.config import RoutingSettings

# RFC 9110 §7.6.1 hop-by-hop headers, plus the ones the gateway owns or recomputes.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | {
    "host",
    "authorization",
    "content-length",
    "accept-encoding",  # the gateway asks for identity bodies so streams pass through unchanged
    "cookie",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
}
NOT_FORWARDED_DOWNSTREAM = HOP_BY_HOP | {
    "content-length",
    "content-encoding",
    "date",
    "server",
    "set-cookie",
}


def create_client_session(routing: RoutingSettings) -> aiohttp.ClientSession:
    """The worker's one client session: pooled keep-alive connections and config timeouts."""
    connector = aiohttp.TCPConnector(
        limit=0,  # per-provider permits bound concurrency; the pool must not queue behind them
        limit_per_host=0,
        keepalive_timeout=30,
        ttl_dns_cache=60,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=routing.connect_timeout_seconds,
        sock_read=routing.first_byte_timeout_seconds,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        raise_for_status=False,
    )


def upstream_headers(
    incoming: Mapping[str, str], provider: Provider, request_id: str, drop: frozenset[str]
) -> CIMultiDict[str]:
    """Headers for the upstream request: the client's, minus hop-by-hop and its credential."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lowered = name.lower()
        if lowered in NOT_FORWARDED_UPSTREAM or lowered in drop or lowered.startswith("x-gateway-"):
            continue
        headers.add(name, value)
    headers["x-request-id"] = request_id
    headers["Accept-Encoding"] = "identity"
    if provider.credential:
        headers["Authorization"] = f"Bearer {provider.credential}"
    return headers


def downstream_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers of the upstream response that may reach the client."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if name.lower() not in NOT_FORWARDED_DOWNSTREAM:
            headers.add(name, value)
    return headers


def is_json_object(body: bytes | bytearray) -> bool:
    """Whether a non-streamed answer parses as the JSON object every OpenAI response is."""
    try:
        return isinstance(orjson.loads(body), dict)
    except orjson.JSONDecodeError:
        return False


def opens_event_stream(opening: bytes) -> bool:
    """Whether the first bytes of a stream start like server-sent events.

    The first line that is not blank must be a comment or a known field (`data:`, `event:`,
    `id:`, `retry:`); `opening` holds at least that line, or `SSE_OPENING_BYTES` of it.
    """
    text = opening.removeprefix(b"\xef\xbb\xbf").lstrip(b"\r\n")
    if not text:
        return True
    line = _FIRST_LINE.match(text)
    first = line.group(0) if line else text
    if first.startswith(b":"):
        return True
    field, colon, _ = first.partition(b":")
    return bool(colon) and field in SSE_FIELDS


class EventStreamFraming:
    """Watches a passed-through SSE stream: event sizes, and whether it ended with `[DONE]`.

    Only the framing is looked at, never the events' content, so a stream passes through
    unchanged and at pass-through speed.
    """

    def __init__(self, max_event_bytes: int = MAX_SSE_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._since_boundary = 0
        self._tail = b""

    def accepts(self, chunk: bytes) -> bool:
        """Note the next chunk; False when it makes one event longer than the limit."""
        window = self._tail + chunk
        boundary = max(
            (window.rfind(separator) + len(separator) for separator in SSE_EVENT_ENDS),
            default=-1,
        )
        if boundary >= len(SSE_EVENT_ENDS[0]) and window.rfind(b"\n\n") + 2 == boundary:
            self._since_boundary = len(window) - boundary
        else:
            self._since_boundary = self._after_boundary(window)
        self._tail = window[-STREAM_TAIL_BYTES:]
        return self._since_boundary <= self._max_event_bytes

    def ended_cleanly(self) -> bool:
        """Whether what was seen so far ends with a complete `data: [DONE]` event."""
        return _DONE_AT_END.search(self._tail) is not None

    def _after_boundary(self, window: bytes) -> int:
        ends = [
            window.rfind(separator) + len(separator)
            for separator in SSE_EVENT_ENDS
            if window.rfind(separator) >= 0
        ]
        if not ends:
            return self._since_boundary + len(window) - len(self._tail)
        return len(window) - max(ends)
