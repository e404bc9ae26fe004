"""Connection limits for slow and oversized clients, where aiohttp has no knob of its own.

aiohttp bounds one header line (`max_field_size`), the request line (`max_line_size`), the number
of headers (`max_headers`) and idle keep-alive time (`keepalive_timeout`). It has no deadline for
a request head that trickles in and no bound on a head's total size: each connection of a
`GuardedSite` (`gateway.edge.site`, which also caps their number) gets a `GuardedRequestHandler`,
aiohttp's handler with a deadline and a size bound for every request head. The request body's
deadline is the handler's to enforce (`body_read_timeout`), since only the handler knows when a
body ends. Each connection also stamps when the end of each request head arrived, and hands the
request's wait since then to an `Admission` (the load shedder's gate) just before the app sees
it.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Protocol

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from gateway.config_service import ServerSettings
from gateway.shared.errors import error_body, error_response

logger = structlog.get_logger("gateway.edge.connections")

# aiohttp's own limit for one header line and for the request line.
AIOHTTP_LINE_LIMIT = 8190
# aiohttp's default for reading (and dropping) a body the handler did not read, before closing.
AIOHTTP_LINGERING_SECONDS = 10.0
# After answering an error at the transport level, keep reading (and dropping) what the client
# still sends for this long, so the answer is not lost to a reset; then close.
LINGER_SECONDS = 1.0
# What a connection over the worker's cap (one of its reserve, see `site`) is served for: the
# probes a load balancer or Kubernetes sends, which must not fail because the worker is busy.
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
CONNECTION_CAP_MESSAGE = "This gateway worker is at its connection limit; retry shortly."
# A request head ends at an empty line; aiohttp's parser also accepts a bare LF as line end.
HEAD_ENDS = (b"\n\n", b"\n\r\n")
# Linux's `struct tcp_info`: its size up to `tcpi_last_ack_recv`, and where `tcpi_last_data_recv`
# (milliseconds since the last data segment arrived) lies in it.
TCP_INFO = getattr(socket, "TCP_INFO", 11)
TCP_INFO_BYTES = 60
LAST_DATA_RECV = slice(52, 56)
# The `Server` header of every answer: the product, never its version or aiohttp's.
SERVER_NAME = "affinity-gateway"
DEFAULT_BODY_READ_TIMEOUT_SECONDS: float = ServerSettings.model_fields[
    "body_read_timeout_seconds"
].default


@dataclass(frozen=True)
class ConnectionLimits:
    """What one worker allows each client connection (see `ServerSettings`)."""

    header_read_timeout: float
    body_read_timeout: float
    keepalive_timeout: float
    max_header_bytes: int
    max_header_count: int
    max_connections: int
    # A connection that waited longer than this in the kernel's accept queue shows the queue
    # stands: the worker takes the queue in batches, whatever its connection count (see site).
    accept_queue_seconds: float

    @classmethod
    def from_settings(cls, server: ServerSettings) -> ConnectionLimits:
        """The limits configured in the `server` section."""
        return cls(
            header_read_timeout=server.header_read_timeout_seconds,
            body_read_timeout=server.body_read_timeout_seconds,
            keepalive_timeout=server.keepalive_timeout_seconds,
            max_header_bytes=server.max_header_bytes,
            max_header_count=server.max_header_count,
            max_connections=server.max_connections_per_worker,
            accept_queue_seconds=server.load_shedding_burst_seconds,
        )


class Admission(Protocol):
    """Decides, as a request's handler is about to start, whether the app serves it."""

    async def admit(self, request: web.BaseRequest, delay: float) -> web.StreamResponse | None:
        """None to serve it, or the response to answer instead; `delay`: how long it waited
        since its head was read, in seconds."""


class _Phase(enum.Enum):
    HEAD = "head"  # a request head is due: the deadline runs
    REQUEST = "request"  # the head arrived; the request is being answered
    IDLE = "idle"  # between requests on a keep-alive connection
    CLOSING = "closing"  # refused; dropping input until the client closes or the linger ends


class _NoAccessLog(AbstractAccessLogger):
    """No access log: the proxy writes one structured line per request itself."""

    @property
    def enabled(self) -> bool:
        """Never enabled, so aiohttp does not even time requests for it."""
        return False

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write nothing."""


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's request handler, plus a deadline and a size bound for each request head.

    The deadline starts when the connection is accepted (for its first request) or when the first
    byte of a later request arrives, and stops at the blank line that ends the head. A head that
    misses it gets 408 and the connection closes (one that never sent a byte is just closed); a
    head over `max_header_bytes` gets 431. On a pipelined connection, heads after the first that
    arrived with it are left to aiohttp's keep-alive timer.

    With an `admission`, each request is first put to it, with how long it waited since the end
    of its head arrived (the latest head, on a pipelined connection): the time the handler read
    it, less how long its last bytes had waited in the kernel by then (`TCP_INFO`'s
    `last_data_recv`). Past its capacity a worker's queue moves into the kernel (its accept
    queue, its sockets' buffers), where the loop's own clock would not see it.
    """

    __slots__ = (
        "__weakref__",
        "_admission",
        "_app_handler",
        "_close_after",
        "_deadline",
        "_head_read_at",
        "_head_size",
        "_head_tail",
        "_kernel_socket",
        "_on_lost",
        "_phase",
        "_probes_only",
        "limits",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        limits: ConnectionLimits,
        on_lost: Callable[[GuardedRequestHandler], None],
        admission: Admission | None = None,
        probes_only: bool = False,
    ) -> None:
        line_limit = min(AIOHTTP_LINE_LIMIT, limits.max_header_bytes)
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=limits.keepalive_timeout,
            max_line_size=line_limit,
            max_field_size=line_limit,
            max_headers=limits.max_header_count,
            lingering_time=min(AIOHTTP_LINGERING_SECONDS, limits.body_read_timeout),
            access_log_class=_NoAccessLog,
            # Bodies stay as sent: a compressed body is refused, or decoded by the handler after
            # authentication and within limits (`gateway.request_body`), never by the parser.
            auto_decompress=False,
        )
        self.limits = limits
        self._on_lost = on_lost
        self._phase = _Phase.HEAD
        self._head_size = 0
        self._head_tail = b""
        self._deadline: asyncio.TimerHandle | None = None
        self._close_after = False
        self._head_read_at = 0.0
        self._kernel_socket: socket.socket | None = None
        self._admission = admission
        self._app_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]] | None = None
        self._probes_only = probes_only
        if (admission is not None or probes_only) and self._request_handler is not None:
            self._app_handler = self._request_handler
            self._request_handler = self._admit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start serving; the first head's deadline runs from now, so silent connections count."""
        super().connection_made(transport)
        self._kernel_socket = transport.get_extra_info("socket")
        self._start_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        """Stop the deadline with everything else aiohttp stops, and free the connection's slot."""
        self._stop_deadline()
        super().connection_lost(exc)
        self._on_lost(self)

    def data_received(self, data: bytes) -> None:
        """Feed aiohttp's parser, watching the size and the end of a head on the way, and
        stamping when a head was read in full."""
        if self._phase is _Phase.CLOSING:
            return
        read_at = time.monotonic()
        if self._phase is _Phase.IDLE and data:
            self._start_head()
        if self._phase is _Phase.HEAD and not self._watch_head(data):
            return
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._head_read_at = read_at - self._kernel_wait()

    def _kernel_wait(self) -> float:
        """Seconds since the connection's last data arrived in the kernel (0 when unknown)."""
        if self._admission is None or self._kernel_socket is None:
            return 0.0
        return kernel_wait(self._kernel_socket)

    async def _admit(self, request: web.BaseRequest) -> web.StreamResponse:
        """Put the request to the admission, then to the app when admitted (on a connection over
        the cap, only a probe; anything else gets the cap's 503 and the connection closes)."""
        assert self._app_handler is not None
        if self._probes_only and not (request.method == "GET" and request.path in PROBE_PATHS):
            self._close_after = True
            return error_response(
                503,
                CONNECTION_CAP_MESSAGE,
                "too_many_connections",
                headers={"Retry-After": "1", "x-request-id": _new_request_id()},
            )
        if self._admission is None:
            return await self._app_handler(request)
        refusal = await self._admission.admit(request, time.monotonic() - self._head_read_at)
        if refusal is None:
            return await self._app_handler(request)
        if not request.content.is_eof():
            self._close_after = True  # the unread body is not waited for
        return refusal

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Send the response; then wait for the next head, or close when asked to.

        While an unread body still arrives, aiohttp lingers over it (`lingering_time`); those
        bytes are no head, so a head after them is left to aiohttp's keep-alive timer.
        """
        if not resp.prepared:
            resp.headers["Server"] = SERVER_NAME
            if self._close_after:
                # Said in the answer: a proxy that took the connection for kept alive would send
                # its next request into the close (nginx answers that request 502).
                resp.force_close()
        outcome = await super().finish_response(request, resp, start_time)
        if self._close_after:
            # aiohttp neither lingers over the body itself nor closes at the end of its loop;
            # the connection drops what still arrives, then closes (see _linger_then_close).
            self._force_close = True
            self._linger_then_close()
        elif self._phase is _Phase.REQUEST and request.content.is_eof():
            self._phase = _Phase.IDLE
        return outcome

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """An OpenAI-shaped error for a request aiohttp could not parse, or that escaped the app.

        aiohttp's own answer is plain text, and its log line quotes the offending bytes, which can
        be part of a credential; this logs only the kind of failure.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("the response already started; the connection is broken")
        status, text, code = _describe_failure(status, exc)
        logger.warning(
            "request_rejected", status=status, reason=type(exc).__name__ if exc else None
        )
        response = error_response(status, text, code, headers={"x-request-id": _new_request_id()})
        response.force_close()
        return response

    def close_after_response(self) -> None:
        """Close the connection once the current response is out, without waiting for the rest
        of the body (what still arrives for a moment is dropped unparsed)."""
        self._close_after = True

    @property
    def settled(self) -> bool:
        """Idle between requests, or with its handler running on a body that has fully arrived:
        safe to start a shutdown.

        Once aiohttp's shutdown begins it ignores every byte a connection receives, so a request
        whose head or body is still arriving, or whose handler has not started, would hang until
        the shutdown timeout and fail.
        """
        if self._phase is _Phase.REQUEST:
            request = self._current_request
            return self._request_in_progress and request is not None and request.content.is_eof()
        return self._phase is not _Phase.HEAD

    def _start_head(self) -> None:
        self._phase = _Phase.HEAD
        self._head_size = 0
        self._head_tail = b""
        self._stop_deadline()
        self._deadline = asyncio.get_running_loop().call_later(
            self.limits.header_read_timeout, self._head_overdue
        )

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _watch_head(self, data: bytes) -> bool:
        """Count `data` into the head; False when the head is refused as too large."""
        limit = self.limits.max_header_bytes
        window = self._head_tail + data
        # Only a blank line within the limit can end an acceptable head.
        end = _head_end(window, limit - self._head_size + len(self._head_tail))
        if end is not None:
            self._phase = _Phase.REQUEST
            self._stop_deadline()
            return True
        self._head_size += len(data)
        if self._head_size > limit:
            self._refuse(
                431,
                f"The request line and headers are larger than the limit of {limit} bytes.",
                "header_too_large",
            )
            return False
        self._head_tail = window[-2:]
        return True

    def _head_overdue(self) -> None:
        self._deadline = None
        if self._phase is not _Phase.HEAD:
            return
        if self._head_size == 0:
            self.force_close()
            return
        self._refuse(
            408,
            f"The request head did not arrive within {self.limits.header_read_timeout:g} s.",
            "header_timeout",
        )

    def _refuse(self, status: int, message: str, code: str) -> None:
        """Answer at the transport level (aiohttp parsed no request), then linger and close."""
        transport = self.transport
        if transport is not None:
            logger.warning("connection_refused", status=status, code=code)
            transport.write(raw_error_response(status, message, code))
        self._linger_then_close()

    def _linger_then_close(self) -> None:
        """Half-close after an answer the client may still be sending a body behind, drop what
        arrives for `LINGER_SECONDS`, then close. Closing at once with unread bytes makes the
        kernel send a reset, which can destroy the answer before the peer reads it (nginx then
        reports 502 instead of relaying the 401 or 413)."""
        self._phase = _Phase.CLOSING
        self._stop_deadline()
        transport = self.transport
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        # Reading may be paused by a full body buffer nobody reads now; resumed, the client's
        # bytes are drained rather than left to stall its writes and reset the close.
        transport.resume_reading()
        self._deadline = asyncio.get_running_loop().call_later(LINGER_SECONDS, self.force_close)


def kernel_wait(connection: socket.socket) -> float:
    """Seconds since the kernel last received data on `connection` (`TCP_INFO`'s
    `last_data_recv`; for a connection nothing arrived on yet, since it was established); 0 when
    unknown (not TCP, or closed)."""
    try:
        info = connection.getsockopt(socket.IPPROTO_TCP, TCP_INFO, TCP_INFO_BYTES)
    except OSError:
        return 0.0
    if len(info) < TCP_INFO_BYTES:
        return 0.0
    return int.from_bytes(info[LAST_DATA_RECV], sys.byteorder) / 1000


def body_read_timeout(request: web.BaseRequest) -> float:
    """How long a request's body may take to arrive: its connection's limit, else the default."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler):
        return protocol.limits.body_read_timeout
    return DEFAULT_BODY_READ_TIMEOUT_SECONDS


def close_after_response(request: web.BaseRequest) -> None:
    """Close the request's connection as soon as its response is out (a guarded one at once)."""
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler):
        protocol.close_after_response()


def raw_error_response(
    status: int, message: str, code: str, *, retry_after: int | None = None
) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection, for the transport level."""
    body = error_body(status, message, code)
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        f"Server: {SERVER_NAME}",
        f"x-request-id: {_new_request_id()}",
    ]
    if retry_after is not None:
        lines.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _head_end(window: bytes, limit: int) -> int | None:
    """Where the blank line ending a request head ends in `window`, if it ends before `limit`."""
    ends = [
        index + len(separator)
        for separator in HEAD_ENDS
        if (index := window.find(separator, 0, limit)) >= 0
    ]
    return min(ends) if ends else None


def _describe_failure(status: int, exc: BaseException | None) -> tuple[int, str, str]:
    """Status, message and code for what aiohttp reports through `handle_error`."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "too many headers" in exc.message.lower()
    ):
        message = "A request header line is too long, or there are too many headers."
        return 431, message, "header_too_large"
    if isinstance(exc, BadHttpMessage) or status == 400:
        return 400, "The request is not valid HTTP.", "bad_http_request"
    if status >= 500:
        return status, "The gateway failed to handle this request.", "internal_error"
    return status, HTTPStatus(status).phrase, f"http_{status}"


def _new_request_id() -> str:
    return uuid.uuid4().hex
