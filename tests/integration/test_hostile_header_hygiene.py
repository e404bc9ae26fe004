"""Headers both ways as an attack: only allow-listed client headers go up; a hostile upstream
that echoes what it received never hands the client the provider's credential."""

from __future__ import annotations

from contextlib import AsyncExitStack

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import Settings
from tests.conftest import GatewayFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, settings_dict

PROVIDER_SECRET = "sk-provider-secret-4f9a1c"
BODY = orjson.dumps({"model": TEST_MODEL, "messages": [{"role": "user", "content": "hi"}]})
SMUGGLED = {
    "api-key": TEST_KEY,
    "x-api-key": TEST_KEY,
    "OpenAI-Organization": "org-victim",
    "OpenAI-Project": "proj-victim",
    "X-Original-URL": "/admin",
    "X-Rewrite-URL": "/admin",
    "X-Forwarded-Host": "evil.example",
    "Cookie": "session=1",
    "X-Hop": "named-in-connection",
    "Connection": "keep-alive, X-Hop",
}


async def echoing_upstream(
    exit_stack: AsyncExitStack, status: int
) -> tuple[str, list[dict[str, str]]]:
    """A real aiohttp server answering `status` with every request header echoed in its body
    and in response headers; the URL and the headers it received."""
    received: list[dict[str, str]] = []

    async def echo(request: web.Request) -> web.Response:
        headers = dict(request.headers)
        received.append(headers)
        echoed = request.headers.get("Authorization", "")
        return web.json_response(
            {"error": {"message": f"bad request; you sent {headers}", "headers": headers}},
            status=status,
            headers={
                "x-request-id": echoed,
                "Content-Disposition": f'attachment; filename="{echoed}"',
                "x-echo": echoed,
            },
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    exit_stack.push_async_callback(server.close)
    return str(server.make_url("")).rstrip("/"), received


async def call(server: TestServer) -> tuple[int, str, bytes]:
    """POST chat with the smuggled headers; status, all response headers as text, body."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            data=BODY,
            headers={
                "Authorization": f"Bearer {TEST_KEY}",
                "Content-Type": "application/json",
                **SMUGGLED,
            },
        ) as response,
    ):
        return response.status, str(list(response.headers.items())), await response.read()


async def gateway_before(start_gateway: GatewayFactory, url: str) -> TestServer:
    """A gateway whose one provider is `url`, with `PROVIDER_SECRET` as its credential."""
    config = settings_dict({"hostile": url})
    config["providers"][0]["api_key"] = PROVIDER_SECRET
    return await start_gateway(Settings.model_validate(config))


@pytest.mark.parametrize("status", [400, 422, 500, 503])
async def test_an_upstream_echo_never_hands_the_client_the_provider_credential(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory, status: int
) -> None:
    """An upstream that echoes request headers in its error body and in its response headers:
    the client gets the error, the provider's credential nowhere in it."""
    url, received = await echoing_upstream(exit_stack, status)
    server = await gateway_before(start_gateway, url)
    answered, headers, body = await call(server)
    assert answered == status
    assert received
    assert received[-1]["Authorization"] == f"Bearer {PROVIDER_SECRET}"
    assert PROVIDER_SECRET not in headers
    assert PROVIDER_SECRET not in body.decode()
    assert TEST_KEY not in headers
    assert TEST_KEY not in body.decode()


async def test_only_allow_listed_client_headers_go_upstream(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """The client's key in any header, organisation and project ids, cookies, forwarding and
    `Connection:`-named headers never reach the upstream; content type and accept do."""
    url, received = await echoing_upstream(exit_stack, 400)
    server = await gateway_before(start_gateway, url)
    await call(server)
    seen = {name.lower() for name in received[-1]}
    assert {name.lower() for name in SMUGGLED}.isdisjoint(seen)
    assert TEST_KEY not in str(received[-1])
    assert "content-type" in seen
    assert "x-request-id" in seen
    assert seen <= {
        "content-type",
        "accept",
        "authorization",
        "x-request-id",
        "accept-encoding",
        "host",
        "content-length",
    }
