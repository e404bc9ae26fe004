"""One keep-alive HTTP/1.1 connection to an upstream: a request out, its answer parsed by llhttp.

The request goes out as one buffer (head and body), or a streamed body in chunked encoding from a
task of its own; the answer's head and body are parsed by `httptools` (llhttp, the C parser aiohttp
wraps too), leniently as aiohttp's client is. Reading is flow-controlled: past HIGH_WATER buffered
bytes the socket is not read until the reader catches up. A connection is reused only after an
answer that was read to its end, whose request went out whole, that did not ask to close, and
that was followed by nothing, and taken again only while nothing waits on its socket.

Statuses outside 100-599, and 101 (a switch of protocols cannot be proxied here), fail the
exchange: they are not answers HTTP/1.1 can relay. A close before any byte of the answer is a
`RequestNotReadError` (safe to send again) when the upstream closed before the request reached
it: a kept connection's reset (what an idle close with unread bytes sends), or a close the
socket shows did not take the request's bytes (`socket_state.request_refused`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.dispatch.socket_state import readable, request_refused
from gateway.dispatch.upstream_errors import (
    ReadTimeoutError,
    RequestNotReadError,
    UpstreamBrokenError,
    UpstreamMalformedError,
)

# Bounds of an answer's head, as aiohttp's client has them.
MAX_HEADERS: Final = 128
MAX_FIELD_BYTES: Final = 8190
MAX_HEAD_BYTES: Final = MAX_HEADERS * 2 * MAX_FIELD_BYTES
# Unread answer bytes past which the socket is not read (aiohttp's client: twice 64 KiB).
HIGH_WATER: Final = 2 * 64 * 1024
_CHUNK_END: Final = b"\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


class _AnswerDoneError(Exception):
    """Raised inside the parser when bytes follow a finished answer."""


class _RefusedAnswerError(Exception):
    """Raised inside the parser when an answer's head cannot be relayed (the exchange failed)."""


class _ClosedParser:
    """Stands for the parser of a closed connection: it is fed nothing more."""

    def feed_data(self, data: bytes) -> None:
        """Nothing is parsed once the connection closed."""

    def get_status_code(self) -> int:
        """No answer on a closed connection."""
        return 0

    def should_keep_alive(self) -> bool:
        """A closed connection carries nothing more."""
        return False


_CLOSED_PARSER = _ClosedParser()


class Http1Connection(asyncio.Protocol):
    """The protocol of one upstream connection; one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        parser = httptools.HttpResponseParser(self)
        self._parser: httptools.HttpResponseParser | _ClosedParser = parser
        # Lenient as aiohttp's client parser is outside its debug mode.
        parser.set_dangerous_leniencies(
            lenient_headers=True,
            lenient_optional_cr_before_lf=True,
            lenient_spaces_after_chunk_size=True,
        )
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.exchanges = 0  # requests begun on this connection
        self.idle_age = 0.0  # how long it had been idle when the current exchange began
        self._received = False  # a byte of the current exchange's answer arrived
        self._refused = False  # the upstream closed before the request reached it
        self._busy = False
        self._reusable = False
        self._sent = True
        self._writer: asyncio.Task[None] | None = None
        self._write_paused = False
        self._drained: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self.status = 0
        self.headers: CIMultiDictProxy[str] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._read_paused = False
        self._complete = False
        self._error: BaseException | None = None
        self._read_timeout: float | None = None
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- the exchange, as the pool and the response drive it

    def begin(
        self, head: bytes, body: bytes | AsyncIterator[bytes] | None, read_timeout: float | None
    ) -> None:
        """Send a request (head and bytes body in one write, or a streamed body from a task)."""
        transport = self.transport
        assert transport is not None
        assert not self._busy
        self._busy = True
        self.exchanges += 1
        self._received = False
        self._refused = False
        self._reusable = False
        self._raw_headers = []
        self._head_bytes = 0
        self.status = 0
        self.headers = None
        self._chunks = deque()
        self._buffered = 0
        self._complete = False
        self._error = None
        self._read_timeout = read_timeout
        if body is None or isinstance(body, bytes):
            transport.write(head + body if body else head)
            self._sent = True
            self._arm_read_timer()
        else:
            transport.write(head)
            self._sent = False
            self._writer = self._loop.create_task(self._send_stream(body))
        # A write that failed at once (the socket was already reset) delivered nothing.
        self._refused = transport.is_closing() and not self.closed

    @property
    def reused(self) -> bool:
        """Whether the current exchange is not the connection's first."""
        return self.exchanges > 1

    @property
    def answer_begun(self) -> bool:
        """Whether any byte of the current exchange's answer arrived."""
        return self._received

    def stale(self) -> bool:
        """Whether an idle connection cannot carry another request: closed, or its socket has
        something to read (the upstream's close not yet seen, or bytes nobody asked for)."""
        return self.closed or readable(self.transport)

    async def head(self) -> None:
        """Wait for the answer's head; raises an UpstreamError when it cannot come."""
        while self.headers is None:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def read(self) -> bytes:
        """The answer's bytes received so far (waiting for some); b"" at its end."""
        chunks = self._chunks
        while not chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
            self._last_read = self._loop.time()
        return data

    @property
    def at_eof(self) -> bool:
        """Whether the answer was read to its end."""
        return self._complete and not self._chunks

    def finish(self) -> bool:
        """End the exchange; True when the connection may carry another request."""
        self._busy = False
        self._cancel_timer()
        reusable = (
            self._reusable
            and self._sent
            and self._complete
            and not self._chunks
            and self._error is None
            and not self.closed
        )
        if not reusable:
            self.abort()
        return reusable

    def abort(self) -> None:
        """Drop the connection at once (an unfinished exchange cannot be resumed).

        The failure raised to the reader is let go: its traceback holds the reader's frames
        (the client's request, an upload's copy) and this connection, a cycle only a garbage
        collection would free; a later read gets a failure of its own."""
        self.closed = True
        self._cancel_timer()
        if self._error is not None:
            self._error = type(self._error)(*self._error.args)
        self._chunks.clear()
        writer, self._writer = self._writer, None
        if writer is not None and not writer.done():
            writer.cancel()
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (uvloop's is not an `asyncio.Transport` subclass, but acts as one)."""
        self.transport = cast("asyncio.Transport", transport)

    def eof_received(self) -> bool | None:
        """The upstream closed its side; with no answer begun, note whether it closed before
        the request reached it (the socket still tells; the transport then closes)."""
        self._note_refusal()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        """The end of a close-delimited answer, or a broken exchange."""
        self._note_refusal(exc)
        self.closed = True
        self._cancel_timer()
        if self._busy and not self._complete and self._error is None:
            if self.headers is not None and self._close_delimited():
                self._complete = True
            elif self._refused:
                self._fail(RequestNotReadError("the upstream closed before reading the request"))
            else:
                self._fail(UpstreamBrokenError("the upstream closed the connection"), exc)
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        # The last callback: the parser (which holds this protocol's methods) is not needed.
        self._parser = _CLOSED_PARSER

    def data_received(self, data: bytes) -> None:
        """Feed the parser; a framing error fails the exchange, bytes after an answer drop it."""
        if not self._busy or self._complete:
            self._unexpected()
            return
        self._received = True
        if self.headers is None:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamMalformedError("the upstream's answer head is too large"))
                return
        if self._read_timeout is not None:
            self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamMalformedError("the upstream switched protocols"))
        except httptools.HttpParserError as error:
            if isinstance(error.__context__, _AnswerDoneError) or self._complete:
                self._unexpected()
            elif not isinstance(error.__context__, _RefusedAnswerError):
                broken = UpstreamMalformedError(f"the upstream's answer is malformed: {error}")
                self._fail(broken, error)

    def pause_writing(self) -> None:
        """The socket's send buffer is full: a streamed body waits."""
        self._write_paused = True

    def resume_writing(self) -> None:
        """The send buffer drained."""
        self._write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- httptools callbacks

    def on_message_begin(self) -> None:
        """A new answer starts; only one may follow each request."""
        if self._complete:
            raise _AnswerDoneError

    def on_header(self, name: bytes, value: bytes) -> None:
        """Collect a head field (trailer fields of a chunked body are ignored)."""
        if self.headers is not None:
            return
        if len(self._raw_headers) >= MAX_HEADERS:
            raise UpstreamMalformedError("the upstream sent too many header fields")
        if len(name) > MAX_FIELD_BYTES or len(value) > MAX_FIELD_BYTES:
            raise UpstreamMalformedError("the upstream sent a header field that is too long")
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        """The head is in: an interim 1xx is skipped, a status that cannot be relayed (101, or
        outside 100-599) fails the exchange, anything else is the answer."""
        status = self._parser.get_status_code()
        if status == 101 or not 100 <= status <= 599:
            self._fail(UpstreamMalformedError(f"the upstream answered with status {status}"))
            raise _RefusedAnswerError
        if status < 200:
            self._raw_headers = []
            return
        self.status = status
        self.headers = CIMultiDictProxy(
            CIMultiDict(
                [
                    (
                        name.decode("utf-8", "surrogateescape"),
                        value.decode("utf-8", "surrogateescape"),
                    )
                    for name, value in self._raw_headers
                ]
            )
        )
        self._wake()

    def on_body(self, body: bytes) -> None:
        """Keep a piece of the body; stop reading the socket while too much is unread."""
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        """The answer ended where its framing says (not counting an interim 1xx)."""
        if self.headers is None:
            return
        self._complete = True
        self._reusable = self._parser.should_keep_alive()
        self._cancel_timer()
        self._wake()

    # -- internals

    async def _send_stream(self, body: AsyncIterator[bytes]) -> None:
        """Send a streamed body in chunked encoding, waiting while the socket is full."""
        transport = self.transport
        assert transport is not None
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if self.closed:
                    return
                transport.writelines((b"%x\r\n" % len(chunk), chunk, _CHUNK_END))
                if self._write_paused:
                    self._drained = self._loop.create_future()
                    await self._drained
            if not self.closed:
                transport.write(_LAST_CHUNK)
                self._sent = True
                self._arm_read_timer()
        except Exception as error:  # noqa: BLE001 - whatever stopped the body ends the exchange
            # The body could not be had (the client's upload failed): the exchange is over.
            self._fail(UpstreamBrokenError("the request body could not be sent"), error)
            self.abort()

    def _close_delimited(self) -> bool:
        """Whether the answer's body runs until the connection closes, as llhttp decides it
        (RFC 9112 6.3): a `Transfer-Encoding` whose last coding is not `chunked`, or neither
        that header nor a `Content-Length`."""
        headers = self.headers
        assert headers is not None
        codings = [
            coding.strip().lower()
            for value in headers.getall("Transfer-Encoding", ())
            for coding in value.split(",")
            if coding.strip()
        ]
        if codings or "Transfer-Encoding" in headers:
            return not codings or codings[-1] != "chunked"
        return "Content-Length" not in headers

    def _note_refusal(self, exc: Exception | None = None) -> None:
        """With the exchange's answer not begun, whether the upstream closed before the request
        reached it: the socket says so, or a kept connection was reset (what an idle close with
        the request unread sends; a write into a reset socket fails the same way). A fresh
        connection's reset is no keep-alive race: the upstream may have read the request."""
        if self._busy and not self._received and not self._refused and not self.closed:
            reset = isinstance(exc, ConnectionResetError | BrokenPipeError)
            self._refused = (reset and self.reused) or request_refused(self.transport)

    def _unexpected(self) -> None:
        """Bytes nobody asked for: the connection cannot be trusted with another request."""
        self._reusable = False
        if not self._busy:
            self.abort()

    def _fail(self, error: BaseException, cause: BaseException | None = None) -> None:
        if self._error is None and not self._complete:
            error.__cause__ = cause
            self._error = error
        self._reusable = False
        self._cancel_timer()
        self._wake()

    async def _wait(self) -> None:
        waiter = self._loop.create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm_read_timer(self) -> None:
        """From the request's end, the upstream may be silent at most `read_timeout` seconds."""
        if self._read_timeout is None:
            return
        self._last_read = self._loop.time()
        self._timer = self._loop.call_at(self._last_read + self._read_timeout, self._check_silence)

    def _check_silence(self) -> None:
        """One timer per silence period, not one per read: re-armed from the last bytes read."""
        self._timer = None
        timeout = self._read_timeout
        if timeout is None or self._complete or self._error is not None:
            return
        now = self._loop.time()
        if self._read_paused:
            self._last_read = now  # the reader is behind, not the upstream (as aiohttp)
        elif now - self._last_read >= timeout:
            self._fail(ReadTimeoutError(f"the upstream sent nothing for {timeout:g} s"))
            return
        self._timer = self._loop.call_at(self._last_read + timeout, self._check_silence)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
