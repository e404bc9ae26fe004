"""A corpus of upstream behaviours (issue 21), each a raw-socket fake upstream, and one runner per
HTTP client that reduces what the client made of it to comparable outcomes.

An outcome is, per request sent in turn on one client: `200 b'{}'` (status and whole body),
`no-connection`, `tls-refused`, `no-answer` (the head never came or could not be used),
`broken-body` (the head came, the body broke) or `timeout`. The differential test runs every case
through the gateway's client and through aiohttp's, and requires the outcomes the table gives;
where they differ, the table says why.
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import cast

import aiohttp

from gateway.dispatch.upstream_errors import (
    ReadTimeoutError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamTlsError,
)
from gateway.dispatch.upstream_pool import UpstreamPool
from tests.support.polling import wait_until
from tests.support.raw_upstream import Exchange, RawServer, Script, answering, read_request, reset

OK = "200 b'{}'"
LENGTH = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n1\r\n}\r\n0\r\n\r\n"
READ_TIMEOUT = 2.0


@dataclass
class Trial:
    """One case's upstream while a client runs: the server, and what the script signals."""

    server: RawServer
    # Set by a script the clients wait for before their next request.
    before_next: asyncio.Event | None = None

    @property
    def first_connection(self) -> bool:
        """Whether the script runs on the upstream's first connection."""
        return len(self.server.connections) == 1


@dataclass(frozen=True)
class UpstreamCase:
    """An upstream behaviour, the outcomes expected from the gateway's client (`ours`) and from
    aiohttp's (`aiohttp`, the same unless given), and why they differ where they do."""

    name: str
    script: Callable[[Trial], Script]
    ours: tuple[str, ...]
    aiohttp: tuple[str, ...] | None = None
    why: str = ""
    # How many requests the upstream may see in all (a request sent twice shows here).
    requests_seen: int | None = None
    tls: bool = False
    trusted: bool = True

    @property
    def aiohttp_outcomes(self) -> tuple[str, ...]:
        """What aiohttp's client is expected to make of it."""
        return self.ours if self.aiohttp is None else self.aiohttp


def fixed(script: Script) -> Callable[[Trial], Script]:
    """A script that needs nothing from the trial."""
    return lambda _: script


def closing_at(phase: bytes, *, by_reset: bool = False) -> Script:
    """Read the request, send `phase` (part of an answer, or nothing), then close (or reset)."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        await read_request(reader, exchange)
        if phase:
            writer.write(phase)
            await writer.drain()
        if by_reset:
            reset(writer)

    return script


def closing_as_the_next_request_arrives(trial: Trial) -> Script:
    """Answer, then close the kept connection while the next request sits unread in the socket:
    the keep-alive race, made certain (an idle close that crosses the request)."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        if trial.first_connection:
            await read_request(reader, exchange)
            # uvloop's transports are not `asyncio.Transport` subclasses, but act as one.
            transport = cast("asyncio.Transport", writer.transport)
            transport.pause_reading()  # the next request stays in the kernel, unread
            writer.write(LENGTH)
            await writer.drain()
            sock = writer.get_extra_info("socket")
            await wait_until(lambda: _readable(sock), timeout=5, message="the next request")
            writer.transport.abort()  # a close with unread bytes: the kernel resets
            return
        while True:
            await read_request(reader, exchange)
            writer.write(LENGTH)
            await writer.drain()

    return script


def reading_the_next_request_then_closing(_: Trial) -> Script:
    """Answer, then read the next request on the kept connection and close without a byte (from
    outside, the keep-alive race: the gateway sends the request again, once, elsewhere)."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        await read_request(reader, exchange)
        writer.write(LENGTH)
        await writer.drain()
        await read_request(reader, exchange)

    return script


def stray_bytes_later(trial: Trial) -> Script:
    """Answer, then send bytes nobody asked for on the idle connection (a late answer)."""
    sent = trial.before_next = asyncio.Event()

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        await read_request(reader, exchange)
        writer.write(LENGTH)
        await writer.drain()
        if trial.first_connection:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
            await writer.drain()
            sent.set()
        await read_request(reader, exchange)
        writer.write(LENGTH)
        await writer.drain()
        await reader.read()

    return script


def half_closing(trial: Trial) -> Script:
    """Answer, then shut the sending side (a FIN) while still reading: a request sent on that
    connection would reach the upstream, which can no longer answer it."""
    shut = trial.before_next = asyncio.Event()

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        await read_request(reader, exchange)
        writer.write(LENGTH)
        if trial.first_connection:
            writer.write_eof()
            await writer.drain()
            shut.set()
            await read_request(reader, exchange)
            return
        await writer.drain()
        await reader.read()

    return script


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


CORPUS: tuple[UpstreamCase, ...] = (
    # -- framing
    UpstreamCase("content-length", fixed(answering(LENGTH, LENGTH)), (OK, OK), requests_seen=2),
    UpstreamCase("chunked", fixed(answering(CHUNKED, CHUNKED)), (OK, OK), requests_seen=2),
    UpstreamCase(
        "close-delimited",
        fixed(answering(b"HTTP/1.1 200 OK\r\n\r\n{}", then_close=True)),
        (OK, OK),
        requests_seen=2,
    ),
    UpstreamCase(
        "transfer-encoding-not-ending-in-chunked-is-close-delimited",
        fixed(
            answering(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n{}", then_close=True
            )
        ),
        (OK,),
    ),
    UpstreamCase(
        "bad-chunk-size-mid-body",
        fixed(closing_at(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\nzz\r\n")),
        ("broken-body",),
        aiohttp=("no-answer",),
        why="a framing error in the head's own read: aiohttp fails the request, the gateway's "
        "client gives the head and fails the body (either way the answer is not used)",
    ),
    UpstreamCase(
        "body-shorter-than-its-length",
        fixed(closing_at(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}")),
        ("broken-body",),
    ),
    UpstreamCase(
        "length-and-chunked-together",
        fixed(
            closing_at(
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}"
            )
        ),
        ("no-answer",),
    ),
    UpstreamCase("not-http", fixed(closing_at(b"SSH-2.0-OpenSSH\r\n\r\n")), ("no-answer",)),
    # -- interim answers
    UpstreamCase(
        "100-continue-then-answer",
        fixed(answering(b"HTTP/1.1 100 Continue\r\n\r\n" + LENGTH)),
        (OK,),
    ),
    UpstreamCase(
        "103-early-hints-then-answer",
        fixed(answering(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + LENGTH)),
        (OK,),
    ),
    UpstreamCase(
        "101-without-upgrade",
        fixed(closing_at(b"HTTP/1.1 101 Switching Protocols\r\n\r\n{}")),
        ("no-answer",),
        aiohttp=("101 b''",),
        why="101 cannot be proxied: the gateway refuses it (D4); aiohttp hands it to its caller",
    ),
    # -- statuses
    UpstreamCase(
        "status-099",
        fixed(closing_at(b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\n{}")),
        ("no-answer",),
        aiohttp=("99 b'{}'",),
        why="a status under 100 is not HTTP (D4); aiohttp relays it, and its `99` is invalid",
    ),
    UpstreamCase(
        "status-600",
        fixed(closing_at(b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\n{}")),
        ("no-answer",),
        aiohttp=("600 b'{}'",),
        why="a status over 599 is not HTTP (D4); aiohttp relays it",
    ),
    UpstreamCase(
        "status-999",
        fixed(closing_at(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\n{}")),
        ("no-answer",),
        aiohttp=("999 b'{}'",),
        why="a status over 599 is not HTTP (D4); aiohttp relays it",
    ),
    UpstreamCase(
        "204-no-body",
        fixed(answering(b"HTTP/1.1 204 No Content\r\n\r\n")),
        ("204 b''",),
    ),
    # -- closes at each phase
    UpstreamCase("close-before-the-answer", fixed(closing_at(b"")), ("no-answer",)),
    UpstreamCase("reset-before-the-answer", fixed(closing_at(b"", by_reset=True)), ("no-answer",)),
    UpstreamCase(
        "close-mid-head", fixed(closing_at(b"HTTP/1.1 200 OK\r\nContent-Le")), ("no-answer",)
    ),
    UpstreamCase(
        "close-after-the-head",
        fixed(closing_at(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")),
        ("broken-body",),
    ),
    # -- stray and late bytes
    UpstreamCase(
        "bytes-after-the-answer",
        fixed(answering(LENGTH + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray", LENGTH)),
        (OK, OK),
        requests_seen=2,
    ),
    UpstreamCase(
        "stray-bytes-on-the-idle-connection",
        stray_bytes_later,
        (OK, OK),
        requests_seen=2,
    ),
    UpstreamCase(
        "half-closed-after-the-answer",
        half_closing,
        (OK, OK),
        requests_seen=2,
    ),
    # -- keep-alive races
    UpstreamCase(
        "close-after-every-answer-without-saying-so",
        fixed(answering(LENGTH, then_close=True)),
        (OK, OK),
        aiohttp=(OK, "no-answer"),
        why="the close arrived before the next request but was not read yet: the gateway's "
        "client checks the socket before reusing a connection (D1); aiohttp reuses it, and "
        "sends only idempotent methods again",
        requests_seen=2,
    ),
    UpstreamCase(
        "close-crossing-the-next-request",
        closing_as_the_next_request_arrives,
        (OK, OK),
        aiohttp=(OK, "no-answer"),
        why="the upstream closed before reading the request: it is sent again on a new "
        "connection (D1); aiohttp sends only idempotent methods again",
        requests_seen=2,
    ),
    UpstreamCase(
        "next-request-read-then-closed",
        reading_the_next_request_then_closing,
        (OK, OK),
        aiohttp=(OK, "no-answer"),
        why="a clean close of a kept-alive connection before any byte of the answer is the "
        "keep-alive race to the gateway, which resends a replayable request once on a new "
        "connection, as Go's net/http does: an honest client never fails for the race, and an "
        "upstream that reads a request and closes without a word sees it twice; aiohttp resends "
        "only idempotent methods",
        requests_seen=3,
    ),
    # -- TLS
    UpstreamCase(
        "tls-self-signed-untrusted",
        fixed(answering(LENGTH)),
        ("tls-refused",),
        tls=True,
        trusted=False,
    ),
    UpstreamCase("tls-self-signed-trusted", fixed(answering(LENGTH, LENGTH)), (OK, OK), tls=True),
)


Client = Callable[[str, int, Trial, ssl.SSLContext | None], Awaitable[list[str]]]


async def _in_turn(count: int, trial: Trial, send: Callable[[], Awaitable[str]]) -> list[str]:
    """`count` requests, one after the other, waiting for what the script signals between."""
    outcomes = []
    for index in range(count):
        if index and trial.before_next is not None:
            await trial.before_next.wait()
            await asyncio.sleep(0)  # one turn of the loop: what arrived meanwhile is seen
        outcomes.append(await send())
    return outcomes


async def through_gateway_client(
    url: str, count: int, trial: Trial, tls: ssl.SSLContext | None
) -> list[str]:
    """The case's requests, in turn, through the gateway's `UpstreamPool`."""
    pool = UpstreamPool(ssl_context=tls)
    try:
        return await _in_turn(count, trial, lambda: _ours(pool, url))
    finally:
        await pool.close()


async def _ours(pool: UpstreamPool, url: str) -> str:
    try:
        response = await pool.request(
            "POST",
            url,
            "/v1/chat/completions",
            [("Content-Type", "application/json")],
            b"{}",
            connect_timeout=5,
            read_timeout=READ_TIMEOUT,
        )
    except UpstreamTlsError:
        return "tls-refused"
    except UpstreamConnectError:
        return "no-connection"
    except ReadTimeoutError:
        return "timeout"
    except UpstreamBrokenError:
        return "no-answer"
    body = b""
    try:
        while chunk := await response.read():
            body += chunk
    except (UpstreamBrokenError, ReadTimeoutError):
        response.close()
        return "broken-body"
    response.release()
    return f"{response.status} {body!r}"


async def through_aiohttp(
    url: str, count: int, trial: Trial, tls: ssl.SSLContext | None
) -> list[str]:
    """The case's requests, in turn, through aiohttp's `ClientSession` (its defaults)."""
    connector = aiohttp.TCPConnector(ssl=tls if tls is not None else True)
    timeout = aiohttp.ClientTimeout(sock_read=READ_TIMEOUT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        return await _in_turn(count, trial, lambda: _aiohttp(session, url))


async def _aiohttp(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.post(
            url + "/v1/chat/completions", data=b"{}", headers={"Content-Type": "application/json"}
        ) as response:
            try:
                body = await response.read()
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, TimeoutError):
                return "broken-body"
            return f"{response.status} {body!r}"
    except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError):
        return "tls-refused"
    except aiohttp.ClientConnectorError:
        return "no-connection"
    except TimeoutError:
        return "timeout"
    except aiohttp.ClientError:
        return "no-answer"


async def run_case(
    case: UpstreamCase,
    client: Client,
    expected: tuple[str, ...],
    stack: AsyncExitStack,
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> tuple[list[str], RawServer]:
    """Run `case` against a fresh upstream through `client`, as many requests as `expected`
    has; the outcomes and the server. `tls`: the server's context and one trusting it."""
    trial = Trial(RawServer(answering()))
    trial.server.script = case.script(trial)
    if case.tls:
        trial.server.tls = tls[0]
    await trial.server.start(stack)
    client_tls = tls[1] if case.tls and case.trusted else None
    return await client(trial.server.url, len(expected), trial, client_tls), trial.server
