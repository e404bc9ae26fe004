"""The shipped nginx as an attacker meets it: underscore headers pass, `/admin/` and `/metrics`
answer only explicit addresses."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.nginx import NginxProcess
from tests.e2e.test_hostile_clients import read_until_closed

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(60),
]

# Another loopback address: a client that is not on nginx's explicit allow-list.
OUTSIDER = "127.0.0.2"


@pytest.fixture
async def nginx(tmp_path: Path) -> AsyncIterator[NginxProcess]:
    """The shipped nginx before a backend that answers every path with the headers it got."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "headers": dict(request.headers)})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    backend = TestServer(app, host="127.0.0.1")
    await backend.start_server()
    process = NginxProcess([backend.port or 0], tmp_path / "nginx")
    process.start()
    yield process
    process.stop()
    await backend.close()


async def get(nginx: NginxProcess, path: str, source: str, *headers: str) -> tuple[int, bytes]:
    """GET `path` through nginx from the local address `source`; status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", nginx.port, local_addr=(source, 0))
    try:
        lines = "".join(f"{header}\r\n" for header in headers)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: edge\r\n{lines}Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        answer = await asyncio.wait_for(read_until_closed(reader), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_underscore_headers_reach_the_gateway(nginx: NginxProcess) -> None:
    """`session_id` and `conversation_id` (session stickiness) pass through nginx."""
    status, body = await get(
        nginx, "/v1/models", "127.0.0.1", "session_id: s-1", "conversation_id: c-1"
    )
    assert status == 200
    received = {name.lower(): value for name, value in orjson.loads(body)["headers"].items()}
    assert received["session_id"] == "s-1"
    assert received["conversation_id"] == "c-1"


@pytest.mark.parametrize("path", ["/admin/status", "/admin/bindings", "/metrics"])
async def test_operator_paths_answer_only_explicit_addresses(
    nginx: NginxProcess, path: str
) -> None:
    """`/admin/*` and `/metrics` are refused to an address not listed, served to one listed;
    the public API answers both."""
    assert (await get(nginx, path, OUTSIDER))[0] == 403
    assert (await get(nginx, path, "127.0.0.1"))[0] == 200
    assert (await get(nginx, "/v1/models", OUTSIDER))[0] == 200
