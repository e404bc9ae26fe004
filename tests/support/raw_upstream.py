"""Raw-socket fake upstreams: loopback servers that send exact bytes, as a hostile or sloppy
upstream would, and record what each connection received."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

# SO_LINGER on with a zero timeout: close sends a reset.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)


@dataclass
class Exchange:
    """What one connection of the raw server received, request by request."""

    requests: list[bytes] = field(default_factory=list)
    closed: bool = False


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Exchange], Awaitable[None]]


@dataclass
class RawServer:
    """A loopback server whose every connection runs `script`; it records each connection."""

    script: Script
    connections: list[Exchange] = field(default_factory=list)
    url: str = ""
    tls: ssl.SSLContext | None = None

    async def start(self, stack: AsyncExitStack) -> RawServer:
        """Listen on a free port until the stack closes."""
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        stack.push_async_callback(server.wait_closed)
        stack.callback(server.close)
        scheme = "https" if self.tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return self

    @property
    def requests(self) -> list[bytes]:
        """Every request received, over all connections, in order of connection."""
        return [request for exchange in self.connections for request in exchange.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        exchange = Exchange()
        self.connections.append(exchange)
        try:
            await self.script(reader, writer, exchange)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            exchange.closed = True
            writer.close()


async def read_request(reader: asyncio.StreamReader, exchange: Exchange) -> bytes:
    """One request (head, and a Content-Length or chunked body), recorded and returned."""
    head = await reader.readuntil(b"\r\n\r\n")
    lowered = head.lower()
    body = b""
    if b"transfer-encoding: chunked" in lowered:
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            chunk = await reader.readexactly(size + 2)
            body += size_line + chunk
            if size == 0:
                break
    elif b"content-length:" in lowered:
        length = int(lowered.split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
    exchange.requests.append(head + body)
    return head + body


def answering(*answers: bytes, then_close: bool = False) -> Script:
    """A script that answers each request in turn with the next of `answers`, as raw bytes."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exchange: Exchange
    ) -> None:
        for answer in answers:
            await read_request(reader, exchange)
            writer.write(answer)
            await writer.drain()
        if not then_close:
            await reader.read()  # until the client closes

    return script


def reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a reset instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
    writer.transport.abort()


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the openssl command."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side TLS context serving `cert`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
