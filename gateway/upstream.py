"""The upstream side: one client session per worker, header hygiene, what answers must look like."""

from __future__ import annotations

import re
from collections.abc import Mapping

import aiohttp
import orjson
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
# A streamed answer's first event is checked before the client sees a byte; it must fit here.
SSE_OPENING_LIMIT = 64 * 1024
SSE_FIELDS = frozenset({b"data", b"event", b"id", b"retry"})
# LLM servers send events of a few tokens; one this large without a blank line is garbage.
MAX_SSE_EVENT_BYTES = 1024 * 1024
SSE_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")
STREAM_TAIL_BYTES = 64
_LINE_END = re.compile(rb"[\r\n]")
_DONE_AT_END = re.compile(rb"(?:^|[\r\n])data: ?\[DONE\](?:\r\n|\r|\n){2}$")


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


def is_success(response: aiohttp.ClientResponse) -> bool:
    """Whether the upstream answered 2xx."""
    return 200 <= response.status < 300


async def read_opening(response: aiohttp.ClientResponse, stream: bool) -> bytes:
    """The first bytes of an answer: one read, or for a 2xx stream its whole first event."""
    opening = await response.content.readany()
    if not (stream and is_success(response)):
        return opening
    while first_event(opening) is None and len(opening) < SSE_OPENING_LIMIT:
        more = await response.content.readany()
        if not more:
            break
        opening += more
    return opening


def usable_answer(
    response: aiohttp.ClientResponse, stream: bool, opening: bytes, whole: bytearray | None
) -> bool:
    """Whether an answer can go to the client: a 2xx must be what the request asked for, an
    SSE stream or a JSON object; other answers (4xx) pass through as the upstream sent them."""
    if not is_success(response):
        return True
    if stream:
        return response.content_type == "text/event-stream" and opens_event_stream(opening)
    return (
        response.content_type == "application/json" and whole is not None and is_json_object(whole)
    )


def is_json_object(body: bytes | bytearray) -> bool:
    """Whether a non-streamed answer parses as the JSON object every OpenAI response is."""
    try:
        return isinstance(orjson.loads(body), dict)
    except orjson.JSONDecodeError:
        return False


def opens_event_stream(opening: bytes) -> bool:
    """Whether a stream starts with a well-formed event: comment and field lines only, its data
    (if any) a JSON object or `[DONE]`. Later events pass through unparsed."""
    event = first_event(opening)
    if event is None:
        return False
    data: list[bytes] = []
    for line in _LINE_END.split(event):
        if not line or line.startswith(b":"):
            continue
        field, colon, value = line.partition(b":")
        if not colon or field not in SSE_FIELDS:
            return False
        if field == b"data":
            data.append(value.removeprefix(b" "))
    if not data:
        return True
    payload = b"\n".join(data)
    return payload == b"[DONE]" or is_json_object(payload)


def first_event(opening: bytes) -> bytes | None:
    """The first event of a stream, without its blank line; None while it is incomplete."""
    text = opening.removeprefix(b"\xef\xbb\xbf").lstrip(b"\r\n")
    ends = [index for separator in SSE_EVENT_ENDS if (index := text.find(separator)) >= 0]
    return text[: min(ends)] if ends else None


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
        ends = [
            index + len(separator)
            for separator in SSE_EVENT_ENDS
            if (index := window.rfind(separator)) >= 0
        ]
        if ends:
            self._since_boundary = len(window) - max(ends)
        else:
            self._since_boundary += len(chunk)
        self._tail = window[-STREAM_TAIL_BYTES:]
        return self._since_boundary <= self._max_event_bytes

    def ended_cleanly(self) -> bool:
        """Whether the stream so far ends with a complete `data: [DONE]` event."""
        return _DONE_AT_END.search(self._tail) is not None
