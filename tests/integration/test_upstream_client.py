"""The proxied requests' upstream client against raw servers sending exact bytes: framing by length,
by chunks and by close; lying and broken framing; what goes back to the pool and what does not;
interim answers, silence, streamed bodies, the request head, idle expiry, flow control and TLS."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import uvloop

from bench.launcher import free_port
from gateway.dispatch.upstream_errors import (
    ConnectTimeoutError,
    ReadTimeoutError,
    RequestNotReadError,
    UpstreamBrokenError,
    UpstreamConnectError,
    UpstreamTlsError,
)
from gateway.dispatch.upstream_pool import UpstreamPool
from gateway.dispatch.upstream_response import UpstreamResponse
from tests.support.polling import wait_until
from tests.support.raw_upstream import (
    Exchange,
    RawServer,
    answering,
    read_request,
    self_signed,
    server_tls,
)
from tests.support.upstream_corpus import Trial, closing_as_the_next_request_arrives

JSON = [("Content-Type", "application/json")]


async def whole(response: UpstreamResponse) -> bytes:
    """Every body byte of an answer."""
    body = b""
    while chunk := await response.read():
        body += chunk
    return body


async def post(
    pool: UpstreamPool,
    url: str,
    body: bytes | AsyncIterator[bytes] | None = b"{}",
    *,
    read_timeout: float | None = None,
    tls_ca_file: str | None = None,
) -> UpstreamResponse:
    """A POST of `body` to `url`'s chat path with a 5 s connect limit."""
    return await pool.request(
        "POST",
        url,
        "/v1/chat/completions",
        JSON,
        body,
        connect_timeout=5,
        read_timeout=read_timeout,
        tls_ca_file=tls_ca_file,
    )


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    """A client pool, closed after the test."""
    client = UpstreamPool()
    yield client
    await client.close()


LENGTH_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
CHUNKED_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
    b"6\r\ndata: \r\n3\r\n{}\n\r\n1\r\n\n\r\n0\r\n\r\n"
)


async def test_length_and_chunked_answers_are_read_whole_over_one_kept_connection(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """A Content-Length answer and a chunked one, in turn, on one connection: both whole, with
    their status, media type and headers; the connection goes back to the pool between them."""
    server = await RawServer(answering(LENGTH_ANSWER, CHUNKED_ANSWER)).start(exit_stack)
    first = await post(pool, server.url)
    assert (first.status, first.content_type, first.content_length) == (200, "application/json", 2)
    assert await whole(first) == b"{}"
    assert first.at_eof
    first.release()
    second = await post(pool, server.url)
    assert second.content_type == "text/event-stream"
    assert second.headers["transfer-encoding"] == "chunked"
    assert await whole(second) == b"data: {}\n\n"
    second.release()
    assert len(server.connections) == 1
    assert len(server.connections[0].requests) == 2


async def test_an_answer_ended_by_close_is_read_to_the_close_and_its_connection_not_kept(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """No length and no chunks: the body runs to the connection's end; the next request opens a
    new connection."""
    answer = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"a": 1}'
    server = await RawServer(answering(answer, then_close=True)).start(exit_stack)
    for _ in range(2):
        response = await post(pool, server.url)
        assert await whole(response) == b'{"a": 1}'
        response.release()
    assert len(server.connections) == 2


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"short": true}', id="length-too-long"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
            id="no-last-chunk",
        ),
    ],
)
async def test_a_body_that_breaks_its_framing_is_an_error_not_an_answer(
    exit_stack: AsyncExitStack, pool: UpstreamPool, answer: bytes
) -> None:
    """A body shorter than its length, a garbled chunk size, or chunks cut off by the close:
    reading raises UpstreamBrokenError (after any bytes that did arrive whole)."""
    server = await RawServer(answering(answer, then_close=True)).start(exit_stack)
    response = await post(pool, server.url)
    assert response.status == 200
    with pytest.raises(UpstreamBrokenError):
        await whole(response)
    response.close()


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            id="length-and-chunked",
        ),
        pytest.param(b"NOT-HTTP garbage\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX-Big: " + b"y" * 9000 + b"\r\n\r\n", id="huge-field"),
        pytest.param(b"", id="closed-without-answer"),
    ],
)
async def test_a_broken_or_missing_head_is_a_broken_connection_not_a_refused_one(
    exit_stack: AsyncExitStack, pool: UpstreamPool, answer: bytes
) -> None:
    """Conflicting framing, garbage, an oversized header or a close before any answer, after
    the request went out: UpstreamBrokenError, which the blame code tells from never
    connecting."""
    server = await RawServer(answering(answer, then_close=True)).start(exit_stack)
    with pytest.raises(UpstreamBrokenError):
        await post(pool, server.url)
    assert server.connections[0].requests


async def test_a_refused_connection_is_a_connect_error(pool: UpstreamPool) -> None:
    """Nobody listening: UpstreamConnectError (never connected)."""
    with pytest.raises(UpstreamConnectError):
        await post(pool, f"http://127.0.0.1:{free_port()}")


async def test_an_unresolvable_name_is_a_connect_error(pool: UpstreamPool) -> None:
    """A name that does not resolve: UpstreamConnectError."""
    with pytest.raises(UpstreamConnectError):
        await post(pool, "http://no-such-host.invalid:9")


async def test_a_connect_that_does_not_finish_is_a_connect_timeout(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """A TLS handshake the server never answers: ConnectTimeoutError after the connect limit."""
    server = await RawServer(answering()).start(exit_stack)  # reads and never answers
    with pytest.raises(ConnectTimeoutError):
        await pool.request(
            "POST",
            server.url.replace("http:", "https:"),
            "/",
            JSON,
            b"{}",
            connect_timeout=0.3,
        )


async def test_bytes_after_an_answer_keep_the_answer_but_not_the_connection(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """An upstream that sends more than its Content-Length: the answer is what the length says,
    and the connection is not reused (what followed could be read as the next answer)."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\n\r\nsmuggled"
    server = await RawServer(answering(answer, LENGTH_ANSWER)).start(exit_stack)
    first = await post(pool, server.url)
    assert await whole(first) == b"{}"
    first.release()
    second = await post(pool, server.url)
    assert await whole(second) == b"{}"
    second.release()
    assert len(server.connections) == 2


async def test_an_unread_answer_drops_its_connection_and_connection_close_is_honoured(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """An answer closed before its end, and one that says `Connection: close`, are not reused."""
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1_000_000
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    first_server = await RawServer(answering(big, LENGTH_ANSWER)).start(exit_stack)
    response = await post(pool, first_server.url)
    assert await response.read()
    assert not response.at_eof
    response.close()
    await wait_until(lambda: first_server.connections[0].closed, message="the dropped connection")
    (await post(pool, first_server.url)).close()
    assert len(first_server.connections) == 2
    second_server = await RawServer(answering(closing, LENGTH_ANSWER)).start(exit_stack)
    response = await post(pool, second_server.url)
    assert await whole(response) == b"{}"
    response.release()
    (await post(pool, second_server.url)).close()
    assert len(second_server.connections) == 2


async def test_an_interim_answer_is_skipped(exit_stack: AsyncExitStack, pool: UpstreamPool) -> None:
    """`100 Continue` before the answer is not the answer."""
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + LENGTH_ANSWER
    server = await RawServer(answering(answer)).start(exit_stack)
    response = await post(pool, server.url)
    assert response.status == 200
    assert await whole(response) == b"{}"
    response.release()


async def test_silence_past_the_read_timeout_is_a_read_timeout_and_data_resets_it(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """With a read timeout, pieces closer together than it pass; a longer silence raises
    ReadTimeoutError, also while waiting for the head."""

    async def trickle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        await read_request(reader, exchange)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(8):
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.15)  # the upstream's own pace (the scenario, not a wait)
        await reader.read()  # then silence

    server = await RawServer(trickle).start(exit_stack)
    response = await post(pool, server.url, read_timeout=0.6)
    received = b""
    while len(received) < 8:
        received += await response.read()
    with pytest.raises(ReadTimeoutError):
        await response.read()
    assert received == b"x" * 8  # 1.2 s of pieces 0.15 s apart outlived the 0.6 s limit
    response.close()
    silent = await RawServer(answering()).start(exit_stack)
    with pytest.raises(ReadTimeoutError):
        await post(pool, silent.url, read_timeout=0.2)


async def test_a_streamed_body_goes_out_chunked_and_the_head_is_only_what_was_given(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """A body given as an async iterable is sent in chunked encoding (empty pieces skipped); the
    head holds the caller's headers, `Host`, `Accept: */*` and the framing, and no
    `User-Agent` or `Accept-Encoding` of the client's own."""
    server = await RawServer(answering(LENGTH_ANSWER)).start(exit_stack)

    async def pieces() -> AsyncIterator[bytes]:
        yield b"hello "
        yield b""
        yield b"world"

    response = await pool.request(
        "POST", server.url + "/base/", "/v1/x?a=%20b", JSON, pieces(), connect_timeout=5
    )
    await whole(response)
    response.release()
    sent = server.connections[0].requests[0]
    host = server.url.removeprefix("http://")
    assert sent == (
        b"POST /base/v1/x?a=%20b HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
        b"Content-Type: application/json\r\nAccept: */*\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
    )


async def test_a_bytes_body_has_a_length_and_no_body_has_none_or_zero(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """POST with bytes: Content-Length; GET without a body: no length; DELETE without: 0."""
    server = await RawServer(answering(LENGTH_ANSWER, LENGTH_ANSWER, LENGTH_ANSWER)).start(
        exit_stack
    )
    for method, body in (("POST", b"{}"), ("GET", None), ("DELETE", None)):
        response = await pool.request(method, server.url, "/r", [], body, connect_timeout=5)
        await whole(response)
        response.release()
    posted, got, deleted = server.connections[0].requests
    assert posted.endswith(b"Content-Type: application/octet-stream\r\nContent-Length: 2\r\n\r\n{}")
    assert b"content-length" not in got.lower()
    assert deleted.endswith(b"Content-Length: 0\r\n\r\n")


async def test_a_line_break_in_a_header_is_refused_before_anything_is_sent(
    pool: UpstreamPool,
) -> None:
    """A header value with CR or LF could smuggle a second request: ValueError."""
    with pytest.raises(ValueError, match="line break"):
        await pool.request(
            "POST", "http://127.0.0.1:9", "/", [("x-a", "b\r\nHost: evil")], b"", connect_timeout=1
        )


async def test_idle_connections_are_closed_after_the_idle_limit(
    exit_stack: AsyncExitStack,
) -> None:
    """A kept connection unused for longer than the idle limit is closed by the client."""
    server = await RawServer(answering(LENGTH_ANSWER)).start(exit_stack)
    pool = UpstreamPool(idle_seconds=0.2)
    exit_stack.push_async_callback(pool.close)
    response = await post(pool, server.url)
    await whole(response)
    response.release()
    await wait_until(lambda: server.connections[0].closed, timeout=5, message="the idle close")


async def test_an_unread_answer_stops_the_socket_being_read(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """While nobody reads an answer, the client stops reading the socket: the upstream's
    writes back up on its side instead of piling up in the gateway's memory."""
    backed_up = asyncio.Event()

    async def flood(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        await read_request(reader, exchange)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n")
        piece = b"z" * 65536
        for _ in range(1024):
            writer.write(piece)
            if writer.transport.get_write_buffer_size() > 8 * 1024 * 1024:
                backed_up.set()
                break
            await asyncio.sleep(0)
        await reader.read()

    server = await RawServer(flood).start(exit_stack)
    response = await post(pool, server.url)
    await asyncio.wait_for(backed_up.wait(), 10)
    first = await response.read()
    assert len(first) <= 4 * 1024 * 1024
    response.close()


async def test_https_is_verified_by_default_and_served_with_a_trusted_certificate(
    exit_stack: AsyncExitStack, tmp_path: Path
) -> None:
    """An https upstream with a self-signed certificate is refused by the default (verifying)
    client, and answers over TLS to a client that trusts that certificate."""
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    exchanges: list[Exchange] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exchange = Exchange()
        exchanges.append(exchange)
        try:
            await read_request(reader, exchange)
            writer.write(LENGTH_ANSWER)
            await writer.drain()
            await reader.read()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_context)
    exit_stack.callback(server.close)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    default = UpstreamPool()
    exit_stack.push_async_callback(default.close)
    with pytest.raises(UpstreamConnectError) as refused:
        await post(default, url)
    assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
    trusting = UpstreamPool(ssl_context=ssl.create_default_context(cafile=str(cert)))
    exit_stack.push_async_callback(trusting.close)
    response = await post(trusting, url)
    assert await whole(response) == b"{}"
    response.release()
    assert exchanges[-1].requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


def test_the_client_works_on_uvloop_as_gateway_serve_runs_it() -> None:
    """`gateway serve` runs on uvloop, whose transports are not asyncio's classes: a kept
    connection carries two exchanges there too."""

    async def exchange_twice() -> tuple[bytes, int]:
        async with AsyncExitStack() as stack:
            server = await RawServer(answering(LENGTH_ANSWER, LENGTH_ANSWER)).start(stack)
            pool = UpstreamPool()
            stack.push_async_callback(pool.close)
            bodies = b""
            for _ in range(2):
                response = await post(pool, server.url)
                bodies += await whole(response)
                response.release()
            return bodies, len(server.connections)

    assert uvloop.run(exchange_twice()) == (b"{}{}", 1)


async def crossing_server(exit_stack: AsyncExitStack) -> RawServer:
    """An upstream that answers, then closes its first connection as the next request arrives
    (unread); later connections answer every request."""
    trial = Trial(RawServer(answering()))
    trial.server.script = closing_as_the_next_request_arrives(trial)
    return await trial.server.start(exit_stack)


async def test_a_streamed_body_the_upstream_closed_on_unread_is_not_sent_again(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """A keep-alive race on a streamed body: RequestNotReadError (the dispatcher may fail over),
    never a replay of a stream the pool cannot rewind."""
    server = await crossing_server(exit_stack)
    first = await post(pool, server.url)
    assert await whole(first) == b"{}"
    first.release()

    async def pieces() -> AsyncIterator[bytes]:
        yield b"{}"

    with pytest.raises(RequestNotReadError):
        await post(pool, server.url, pieces())
    assert len(server.connections) == 1
    assert len(server.requests) == 1


async def test_after_a_keep_alive_race_connections_idle_as_long_are_not_reused(
    exit_stack: AsyncExitStack, pool: UpstreamPool
) -> None:
    """The race is answered by sending the request again on a new connection; from then on a
    connection to that upstream idle for as long as the raced one is not reused (its idle
    close is near), so the next request opens a new connection instead of racing again."""
    server = await crossing_server(exit_stack)
    loop = asyncio.get_running_loop()
    first = await post(pool, server.url)
    await whole(first)
    released = loop.time()
    first.release()
    second = await post(pool, server.url)  # raced, then sent again on a new connection
    raced_idle = loop.time() - released  # at least the raced connection's idle time
    assert await whole(second) == b"{}"
    second.release()
    again = loop.time()
    await wait_until(lambda: loop.time() - again > raced_idle, message="as long an idle time")
    third = await post(pool, server.url)
    assert await whole(third) == b"{}"
    third.release()
    assert len(server.connections) == 3
    assert len(server.requests) == 3  # each request reached the upstream once


async def test_a_private_ca_named_by_ssl_cert_file_is_trusted(
    exit_stack: AsyncExitStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/design.md's way to trust a private CA: `SSL_CERT_FILE` in the gateway's environment
    makes the default (verifying) client accept an upstream whose certificate that CA signs;
    a proxy variable changes nothing (the upstream is connected directly)."""
    cert, key = self_signed(tmp_path)
    server = await RawServer(answering(LENGTH_ANSWER), tls=server_tls(cert, key)).start(exit_stack)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there
    trusting = UpstreamPool()
    exit_stack.push_async_callback(trusting.close)
    response = await post(trusting, server.url)
    assert await whole(response) == b"{}"
    response.release()
    assert len(server.requests) == 1


async def test_a_providers_tls_ca_file_is_what_its_certificate_is_verified_against(
    exit_stack: AsyncExitStack, pool: UpstreamPool, tmp_path: Path
) -> None:
    """With `tls_ca_file`, an upstream whose certificate that file's CA signs is trusted by the
    default pool, and the same upstream without it is refused (the system's CAs); a file that
    changed is read again at the next connection."""
    cert, key = self_signed(tmp_path)
    server = await RawServer(
        answering(LENGTH_ANSWER, LENGTH_ANSWER), tls=server_tls(cert, key)
    ).start(exit_stack)
    with pytest.raises(UpstreamTlsError) as refused:
        await post(pool, server.url)
    assert "certificate verify failed" in refused.value.reason
    response = await post(pool, server.url, tls_ca_file=str(cert))
    assert await whole(response) == b"{}"
    response.close()
    other, _ = self_signed(tmp_path / "other")
    read_at = cert.stat().st_mtime_ns
    cert.write_bytes(other.read_bytes())  # now names a CA that did not sign the server's
    os.utime(cert, ns=(read_at + 10**9, read_at + 10**9))  # changed, whatever the clock's grain
    with pytest.raises(UpstreamTlsError):
        await post(pool, server.url, tls_ca_file=str(cert))
