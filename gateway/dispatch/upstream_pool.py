"""The worker's upstream client for proxied requests: pooled keep-alive HTTP/1.1 connections.

What aiohttp's `ClientSession` gave the request path, at a fraction of its cost per request: no
pool limit; idle connections closed after IDLE_SECONDS; names resolved once per DNS_TTL_SECONDS
(concurrent look-ups of one name shared) and connected with Happy Eyeballs; https verified against
the system's trust store; a connect timeout apart from the caller's read limits; a request head
as the caller gave it (no `User-Agent`, no `Accept-Encoding` of its own, `Accept: */*` and a
content type filled in as aiohttp does); redirects never followed and bodies never decoded (it
does neither). A pooled connection is taken only while nothing waits on its socket. A request
is sent again at most once, always on a new connection, and only where it cannot run twice: see
`may_send_again`. Answers are `UpstreamResponse`s read with `read()`, then released
(`release()`, back to the pool when read to the end) or dropped (`close()`).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any, Final
from urllib.parse import quote

import aiohappyeyeballs

from gateway.dispatch.http1 import Http1Connection
from gateway.dispatch.origin import Origin, parse_origin
from gateway.dispatch.upstream_errors import (
    ConnectTimeoutError,
    RequestNotReadError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamMalformedError,
    UpstreamTlsError,
)
from gateway.dispatch.upstream_response import UpstreamResponse

IDLE_SECONDS: Final = 30.0
DNS_TTL_SECONDS: Final = 60.0
HAPPY_EYEBALLS_DELAY: Final = 0.25
# After a keep-alive race, connections to that origin idle for longer than this share of the
# idle time at which the upstream closed one are not used again (its idle limit is near).
RACE_IDLE_SHARE: Final = 0.75
# Methods aiohttp sends again once on a connection that failed before the answer (RFC 9112 9.3.1).
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_NO_BODY_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
# A request target is sent as given, except bytes outside visible ASCII, which are escaped.
_UNSAFE_TARGET: Final = re.compile(r"[^\x21-\x7e]")
_LINE_BREAK: Final = re.compile(r"[\r\n]")

AddressInfo = tuple[Any, ...]
RequestBody = bytes | AsyncIterator[bytes] | None


def request_head(
    origin: Origin, method: str, target: str, headers: Iterable[tuple[str, str]], body: RequestBody
) -> bytes:
    """The request line and header block; ValueError for a line break in a name or value."""
    if _UNSAFE_TARGET.search(target):
        target = _UNSAFE_TARGET.sub(lambda match: quote(match.group()), target)
    lines = [f"{method} {origin.prefix}{target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
    named = set()
    for name, value in headers:
        if _LINE_BREAK.search(name) or _LINE_BREAK.search(value):
            raise ValueError(f"a line break in header {name!r}")
        named.add(name.lower())
        lines.append(f"{name}: {value}\r\n")
    if origin.basic_auth is not None and "authorization" not in named:
        lines.append(f"Authorization: {origin.basic_auth}\r\n")
    if "accept" not in named:
        lines.append("Accept: */*\r\n")
    if method in _BODY_METHODS and "content-type" not in named:
        lines.append("Content-Type: application/octet-stream\r\n")
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
    elif body is None:
        lines.append("\r\n" if method in _NO_BODY_METHODS else "Content-Length: 0\r\n\r\n")
    else:
        lines.append("Transfer-Encoding: chunked\r\n\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def _spent(connection: Http1Connection, oldest: float) -> bool:
    """Whether an idle connection can no longer be used: idle since before `oldest`, closed, or
    with something to read (the upstream's close on its way, or stray bytes)."""
    return connection.idle_since < oldest or connection.stale()


def may_send_again(
    method: str, body: RequestBody, connection: Http1Connection, error: UpstreamBrokenError
) -> bool:
    """Whether a request whose exchange failed before its answer's head may be sent again, once,
    on a new connection. The rule: never when the upstream may have run it, unless the method
    says running it twice is harmless.

    - A reused connection that ended before the upstream read the request (a keep-alive race:
      the upstream closed it as the request was on its way, and the socket shows the request's
      bytes were refused or never acknowledged; `RequestNotReadError`): any method. The
      upstream never saw the request.
    - A reused connection the upstream closed cleanly before any byte of its answer: any method,
      as Go's net/http resends a replayable request on a server-closed idle connection. The
      upstream closing a kept-alive connection is nearly always the race: it read nothing, or it
      dropped what it read with the connection. An upstream that reads a request and then closes
      without a word gets it a second time; an honest client's request never fails for a race.
    - A connection that closed before any answer, for an idempotent method (RFC 9110 9.2.2),
      as aiohttp does: running it twice is harmless.
    - Never a streamed body (it cannot be replayed here; the dispatcher decides on failover),
      nor after a malformed answer (the upstream answered, wrongly).
    """
    if isinstance(body, AsyncIterator) or isinstance(error, UpstreamMalformedError):
        return False
    if isinstance(error, RequestNotReadError):
        return connection.reused
    if connection.reused and connection.closed:
        return True
    return method in IDEMPOTENT and connection.closed


def default_tls_context() -> ssl.SSLContext:
    """The verifying TLS context aiohttp uses by default: the system's trust store."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(("http/1.1",))
    return context


def _tls_reason(error: ssl.SSLError) -> str:
    """Why a TLS handshake failed, in the TLS library's words (never certificate contents)."""
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    return str(error.reason or error.strerror or type(error).__name__)


class UpstreamPool:
    """Keep-alive connections per origin, for the worker's lifetime."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        idle_seconds: float = IDLE_SECONDS,
        dns_ttl_seconds: float = DNS_TTL_SECONDS,
    ) -> None:
        self._ssl = ssl_context if ssl_context is not None else default_tls_context()
        self._idle_seconds = idle_seconds
        self._dns_ttl = dns_ttl_seconds
        self._origins: dict[tuple[str, str | None], Origin] = {}
        # Contexts for providers' own CA files, by path, with the modification time they were
        # read at (a changed file is read again at the next connection).
        self._ca_contexts: dict[str, tuple[int, ssl.SSLContext]] = {}
        self._idle: dict[Origin, list[Http1Connection]] = {}
        # Per origin, the idle time past which a connection is not reused (learnt from races).
        self._reuse_limits: dict[Origin, float] = {}
        self._addresses: dict[tuple[str, int], tuple[float, list[AddressInfo]]] = {}
        self._lookups: dict[tuple[str, int], asyncio.Task[list[AddressInfo]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self,
        method: str,
        base_url: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: RequestBody,
        *,
        connect_timeout: float | None,
        read_timeout: float | None = None,
        tls_ca_file: str | None = None,
    ) -> UpstreamResponse:
        """Send a request to `base_url` + `target` and wait for the answer's head.

        Raises UpstreamConnectError (no connection; UpstreamTlsError for a failed handshake),
        ConnectTimeoutError, UpstreamBrokenError (the connection failed after the request started
        out: RequestNotReadError when the upstream closed before reading it, UpstreamMalformedError
        when the answer's head cannot be relayed) or ReadTimeoutError (silence longer than
        `read_timeout` from the request's end; None: none). https is verified against the
        system's CAs, or `tls_ca_file`'s.
        """
        origin = self._origins.get((base_url, tls_ca_file))
        if origin is None:
            origin = parse_origin(base_url, tls_ca_file)
            self._origins[base_url, tls_ca_file] = origin
        head = request_head(origin, method, target, headers, body)
        again = True
        while True:
            pooled = self._pooled(origin) if again else None
            connection = pooled or await self._connect(origin, connect_timeout)
            try:
                connection.begin(head, body, read_timeout)
                await connection.head()
            except UpstreamBrokenError as error:
                resend = again and may_send_again(method, body, connection, error)
                self._learn_from(origin, connection, error)
                connection.abort()
                if resend:
                    again = False
                    continue
                raise
            except BaseException:
                connection.abort()
                raise
            return UpstreamResponse(self, origin, connection)

    def put(self, origin: Origin, connection: Http1Connection) -> None:
        """Keep a connection whose exchange ended cleanly for the next request to `origin`."""
        if self._closed:
            connection.abort()
            return
        loop = asyncio.get_running_loop()
        connection.idle_since = loop.time()
        self._idle.setdefault(origin, []).append(connection)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._idle_seconds, self._sweep)

    async def close(self) -> None:
        """Close every idle connection; connections in use close when their answer is done."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connections in self._idle.values():
            for connection in connections:
                connection.abort()
        self._idle.clear()
        for lookup in self._lookups.values():
            lookup.cancel()

    def _pooled(self, origin: Origin) -> Http1Connection | None:
        """The most recently used live idle connection to `origin`, if any, and not idle for
        longer than the origin's learnt reuse limit."""
        connections = self._idle.get(origin)
        if not connections:
            return None
        now = asyncio.get_running_loop().time()
        oldest = now - min(self._idle_seconds, self._reuse_limits.get(origin, math.inf))
        while connections:
            connection = connections.pop()
            if not _spent(connection, oldest):
                connection.idle_age = now - connection.idle_since
                return connection
            connection.abort()
        return None

    def _learn_from(
        self, origin: Origin, connection: Http1Connection, error: UpstreamBrokenError
    ) -> None:
        """A reused connection that ended before any byte of its answer lost a keep-alive race:
        the upstream closes connections idle for about as long as this one was. Connections to
        it idle for longer than RACE_IDLE_SHARE of that are not reused from now on, so the race
        is not run again (whether or not this request could be sent again)."""
        if not connection.reused or connection.answer_begun:
            return
        if isinstance(error, UpstreamMalformedError):
            return
        limit = connection.idle_age * RACE_IDLE_SHARE
        self._reuse_limits[origin] = min(limit, self._reuse_limits.get(origin, math.inf))

    def _sweep(self) -> None:
        """Close connections idle for longer than the idle limit; again later while any are left."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        oldest = loop.time() - self._idle_seconds
        for origin, connections in list(self._idle.items()):
            kept = []
            for connection in connections:
                if _spent(connection, oldest):
                    connection.abort()
                else:
                    kept.append(connection)
            if kept:
                self._idle[origin] = kept
            else:
                del self._idle[origin]
        if self._idle:
            self._sweeper = loop.call_later(self._idle_seconds / 2, self._sweep)

    async def _connect(self, origin: Origin, limit: float | None) -> Http1Connection:
        """A new connection (TLS for https), within `limit` seconds once the name is resolved."""
        addresses = await self._resolve(origin)
        loop = asyncio.get_running_loop()
        context = self._tls_context(origin) if origin.tls else None
        try:
            async with asyncio.timeout(limit):
                sock = await aiohappyeyeballs.start_connection(
                    addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, loop=loop
                )
                _, connection = await loop.create_connection(
                    lambda: Http1Connection(loop),
                    sock=sock,
                    ssl=context,
                    server_hostname=origin.host if origin.tls else None,
                )
        except ssl.SSLError as error:  # verification or handshake: the TLS library's reason
            where = f"{origin.host}:{origin.port}"
            reason = _tls_reason(error)
            raise UpstreamTlsError(f"TLS with {where} failed: {reason}", reason) from error
        except OSError as error:  # refused, unreachable, reset during the handshake
            where = f"{origin.host}:{origin.port}"
            if isinstance(error, TimeoutError) and error.errno is None:  # the limit, not the OS
                raise ConnectTimeoutError(f"no connection to {where} in time") from None
            raise UpstreamConnectError(f"cannot connect to {where}") from error
        return connection

    def _tls_context(self, origin: Origin) -> ssl.SSLContext:
        """The context verifying `origin`: its own CA file's (read again once changed), or the
        pool's."""
        path = origin.tls_ca_file
        if path is None:
            return self._ssl
        try:
            modified = os.stat(path).st_mtime_ns
            cached = self._ca_contexts.get(path)
            if cached is not None and cached[0] == modified:
                return cached[1]
            context = ssl.create_default_context(cafile=path)
        except (OSError, ssl.SSLError) as error:
            reason = f"tls_ca_file unusable: {type(error).__name__}"
            where = f"{origin.host}:{origin.port}"
            raise UpstreamTlsError(f"TLS with {where} failed: {reason}", reason) from error
        context.set_alpn_protocols(("http/1.1",))
        self._ca_contexts[path] = (modified, context)
        return context

    async def _resolve(self, origin: Origin) -> list[AddressInfo]:
        """The origin's addresses, cached for the DNS TTL; one look-up at a time per name."""
        key = (origin.host, origin.port)
        loop = asyncio.get_running_loop()
        cached = self._addresses.get(key)
        if cached is not None and cached[0] > loop.time():
            return cached[1]
        lookup = self._lookups.get(key)
        if lookup is None:
            lookup = self._lookups[key] = loop.create_task(self._look_up(key))
            lookup.add_done_callback(lambda _: self._lookups.pop(key, None))
        return await asyncio.shield(lookup)

    async def _look_up(self, key: tuple[str, int]) -> list[AddressInfo]:
        loop = asyncio.get_running_loop()
        host, port = key
        try:
            infos = await loop.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG
            )
        except OSError as error:
            raise UpstreamConnectError(f"cannot resolve {host}") from error
        if not infos:
            raise UpstreamConnectError(f"cannot resolve {host}")
        addresses = list(infos)
        self._addresses[key] = (loop.time() + self._dns_ttl, addresses)
        return addresses
