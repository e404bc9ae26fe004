"""The upstream side: the worker's clients, header hygiene, what answers must look like."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.catalog import Provider
from gateway.config_service import RoutingSettings
from gateway.dispatch.outcomes import RetryableAttemptError
from gateway.dispatch.upstream_errors import UpstreamError
from gateway.dispatch.upstream_response import UpstreamResponse
from gateway.shared.redaction import Redactor

# Client headers that go upstream: what an OpenAI-compatible server reads, nothing else. The
# gateway sets `Authorization` (the provider's own credential), `x-request-id` and
# `Accept-Encoding` itself; the client's key, cookies, forwarding and hop-by-hop headers, headers
# named in `Connection:`, organisation and project ids stay at the gateway.
UPSTREAM_ALLOWED = frozenset(
    {
        "content-type",
        "accept",
        "openai-beta",  # OpenAI's opt-in to beta API shapes
        "idempotency-key",
        # W3C trace context: distributed tracing goes on through the gateway.
        "traceparent",
        "tracestate",
    }
)
# Upstream response headers that reach the client, and those renamed on the way: an upstream's
# own ids and timings are told apart from the gateway's; anything else (account rate limits,
# organisation, cookies, server software) stays upstream.
DOWNSTREAM_ALLOWED = frozenset({"content-type", "cache-control", "content-disposition"})
# W3C trace context an upstream answers with (`traceresponse` is the draft's response header).
DOWNSTREAM_TRACE_CONTEXT = frozenset({"traceparent", "tracestate", "traceresponse"})
DOWNSTREAM_RENAMED = {
    "x-request-id": "x-upstream-request-id",
    "request-id": "x-upstream-request-id",
    "openai-processing-ms": "x-upstream-processing-ms",
    "x-simulator-node": "x-upstream-node",
}
SSE_FIELDS = frozenset({b"data", b"event", b"id", b"retry"})
# Past the first event, one event this large without a blank line is garbage.
MAX_SSE_EVENT_BYTES = 1024 * 1024
SSE_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r\n")
STREAM_TAIL_BYTES = 64
_LINE_END = re.compile(rb"[\r\n]")
# What no header value may carry to the client (aiohttp refuses to write it): controls but HTAB.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_EVENT_END = re.compile(b"|".join(re.escape(separator) for separator in SSE_EVENT_ENDS))
# JSON's whitespace, what may surround an answer's object.
JSON_SPACE = b" \t\r\n"
_JSON_OPENING = re.compile(rb"[ \t\r\n]*\{")
CLOSING_BRACE = ord("}")
JSON_TAIL_BYTES = 64


def create_client_session(routing: RoutingSettings) -> aiohttp.ClientSession:
    """The worker's aiohttp session for everything but proxied requests (the load poller):
    pooled keep-alive connections. Proxied requests go over `UpstreamPool`."""
    connector = aiohttp.TCPConnector(
        limit=0,  # per-provider permits bound concurrency; the pool must not queue behind them
        limit_per_host=0,
        keepalive_timeout=30,
        ttl_dns_cache=60,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=routing.connect_timeout_seconds)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        raise_for_status=False,
    )


def upstream_headers(
    incoming: Mapping[str, str], provider: Provider, request_id: str, drop: frozenset[str]
) -> list[tuple[str, str]]:
    """Headers for the upstream request: the client's that pass `UPSTREAM_ALLOWED` (less
    `drop`), the request id, and the provider's credential."""
    headers = [
        (name, value)
        for name, value in incoming.items()
        if (lowered := name.lower()) in UPSTREAM_ALLOWED and lowered not in drop
    ]
    headers.append(("x-request-id", request_id))
    headers.append(("Accept-Encoding", "identity"))
    if provider.credential:
        headers.append(("Authorization", f"Bearer {provider.credential}"))
    return headers


def downstream_headers(
    upstream: CIMultiDictProxy[str], redactor: Redactor | None
) -> CIMultiDict[str]:
    """The upstream response headers that may reach the client, through the allow-list, with
    the provider's credential redacted from their values; a field with a control character in
    its value is dropped (it cannot be written to the client)."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        if _CONTROL.search(value):
            continue
        lowered = name.lower()
        shown = redactor.redact_text(value) if redactor is not None else value
        if lowered in DOWNSTREAM_ALLOWED or lowered in DOWNSTREAM_TRACE_CONTEXT:
            headers.add(name, shown)
        elif lowered in DOWNSTREAM_RENAMED:
            headers[DOWNSTREAM_RENAMED[lowered]] = shown
    return headers


def is_success(response: UpstreamResponse) -> bool:
    """Whether the upstream answered 2xx."""
    return 200 <= response.status < 300


async def read_opening(response: UpstreamResponse, stream: bool, limit: int) -> bytes:
    """The first bytes of an answer: one read, or for a 2xx stream its whole first event, over
    as many reads as it takes, up to `limit` bytes."""
    opening = await response.read()
    if not (stream and is_success(response)) or first_event(opening) is not None:
        return opening
    buffer = bytearray(opening)
    try:
        while len(buffer) < limit:
            more = await response.read()
            if not more:
                break
            # Only a separator in the new bytes (or across the boundary) can end the first event.
            window = bytes(buffer[-3:]) + more
            buffer += more
            ended = any(separator in window for separator in SSE_EVENT_ENDS)
            if ended and first_event(bytes(buffer)) is not None:
                break
    except BaseException:
        del buffer  # as in read_rest: a traceback must not keep the buffer alive
        raise
    return bytes(buffer)


def usable_answer(
    response: UpstreamResponse, stream: bool, opening: bytes, whole: bytearray | None
) -> bool:
    """Whether an answer can go to the client: a 2xx must be what the request asked for, an
    SSE stream or a JSON object; other answers (4xx) pass through as the upstream sent them."""
    if not is_success(response):
        return True
    if stream:
        return response.content_type == "text/event-stream" and opens_event_stream(opening)
    return (
        response.content_type == "application/json"
        and whole is not None
        and looks_like_json_object(whole)
    )


def looks_like_json_object(body: bytes | bytearray) -> bool:
    """Whether a non-streamed answer is framed as a JSON object: its first and last non-space
    bytes are `{` and `}`. It is forwarded unchanged, so it is not parsed: this tells a JSON
    object from an error page, plain text, an array or a cut-off body, not valid JSON from
    invalid."""
    if _JSON_OPENING.match(body) is None:
        return False
    tail = body[-JSON_TAIL_BYTES:].rstrip(JSON_SPACE)
    if not tail and len(body) > JSON_TAIL_BYTES:  # a long run of trailing space: look at all
        tail = body.rstrip(JSON_SPACE)
    return len(tail) > 0 and tail[-1] == CLOSING_BRACE


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
    end = _EVENT_END.search(text)  # the earliest separator of any kind
    return text[: end.start()] if end is not None else None


class EventStreamFraming:
    """Watches a passed-through SSE stream's event sizes. A stream may end as it likes (with or
    without `[DONE]`, comments and blank lines after it): that is the upstream's to decide.

    Only the framing is looked at, never the events' content, so a stream passes through
    unchanged and at pass-through speed.
    """

    def __init__(self, max_event_bytes: int = MAX_SSE_EVENT_BYTES) -> None:
        self._max_event_bytes = max_event_bytes
        self._since_boundary = 0
        self._tail = b""

    def accepts(self, chunk: bytes) -> bool:
        """Note the next chunk; False when it makes one event longer than the limit."""
        if chunk.endswith(SSE_EVENT_ENDS):  # the usual chunk: whole events, nothing pending
            self._since_boundary = 0
            recent = chunk if len(chunk) >= STREAM_TAIL_BYTES else self._tail + chunk
            self._tail = recent[-STREAM_TAIL_BYTES:]
            return True
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


async def read_rest(
    response: UpstreamResponse,
    first_chunk: bytes,
    limit: int,
    take: Callable[[int], Awaitable[None]] | None = None,
) -> bytearray:
    """A non-streamed answer, whole (still before the client sees a byte), bounded in size by
    `limit`, each piece counted by `take` (the worker's answer budget) before it is kept; the
    caller bounds it in time. Raises RetryableAttemptError when it cannot be had."""
    if response.content_length is not None and response.content_length > limit:
        raise RetryableAttemptError("oversized_response", status=response.status)
    answer = bytearray()
    failure: RetryableAttemptError | None = None
    try:
        chunk = first_chunk
        while True:
            if take is not None:
                await take(len(chunk))
            answer += chunk
            if len(answer) > limit or not (chunk := await response.read()):
                break
    except UpstreamError:
        failure = RetryableAttemptError("payload_error", status=response.status)
    except BaseException:
        # Cut off by the caller's deadline (or a cancellation): the exception's traceback keeps
        # this frame alive for a while, so it must not keep the buffer too.
        del answer
        raise
    if failure is None and len(answer) > limit:
        failure = RetryableAttemptError("oversized_response", status=response.status)
    if failure is not None:
        # The retry state keeps a failure's traceback, and so this frame, for the rest of the
        # request (and in a cycle beyond it): it must not keep the buffer too.
        del answer
        raise failure
    return answer


def close_response(response: UpstreamResponse | None) -> None:
    """Let go of an upstream answer: an unfinished body drops the connection (so an upstream
    still generating sees the cancellation at once); a finished one returns to the pool."""
    if response is None:
        return
    if response.at_eof:
        response.release()
    else:
        response.close()
