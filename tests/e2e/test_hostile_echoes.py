"""An upstream that echoes its credential back, in every form it might, through a real `gateway
serve`: in successful answers (whole and streamed, split across writes), and in error bodies as
base64 and `\\u`-escaped JSON. The client never gets the credential in any of them."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.launcher import GatewayProcess
from tests.e2e.test_hostile_clients import start_gateway_process
from tests.support.gateway import TEST_KEY, chat_body, settings_dict

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SECRET = "sk-provider-secret-4f9a1c77e0"
BEARER = f"Bearer {SECRET}"


def escaped(text: str) -> str:
    """Every character as a JSON `\\u` escape."""
    return "".join(f"\\u{ord(char):04x}" for char in text)


# What the upstream hands back, and the forms of the credential that must not reach the client.
FORMS = (
    SECRET,
    escaped(SECRET),
    base64.b64encode(BEARER.encode()).decode(),
    base64.b64encode(f"user:{SECRET}".encode()).decode(),
    base64.urlsafe_b64encode(b"{" + BEARER.encode()).decode(),
)


def completion(text: str) -> bytes:
    """A chat completion whose content is `text` (escapes kept as written)."""
    return (
        b'{"id":"chatcmpl-1","object":"chat.completion","model":"org/test-model-upstream",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"'
        + text.encode()
        + b'"},"finish_reason":"stop"}]}'
    )


async def echo(request: web.Request) -> web.StreamResponse:
    """Echo the credential the request came with in every form: 2xx whole, 2xx stream (each
    form split across two writes), or a 400 error body."""
    body = await request.json()
    seen = request.headers["Authorization"].removeprefix("Bearer ")
    assert seen == SECRET
    forms = " | ".join(
        (
            seen,
            escaped(seen),
            base64.b64encode(f"Bearer {seen}".encode()).decode(),
            base64.b64encode(f"user:{seen}".encode()).decode(),
            base64.urlsafe_b64encode(b"{" + f"Bearer {seen}".encode()).decode(),
        )
    )
    if body.get("messages", [{}])[0].get("content") == "error":
        return web.Response(
            status=400,
            body=json.dumps({"error": {"message": forms, "raw": f"you sent {forms}"}}),
            content_type="application/json",
        )
    if not body.get("stream"):
        return web.Response(body=completion(forms), content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in forms.split(" | "):
        # Written out, not serialized: the escapes stay as the upstream chose them.
        event = b'data: {"object":"chat.completion.chunk","choices":[{"delta":{"content":"'
        event += piece.encode() + b'"}}]}\n\n'
        middle = event.index(piece[:4].encode()) + len(piece) // 2
        await response.write(event[:middle])
        await response.write(event[middle:])
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@pytest.fixture
async def gateway(
    exit_stack: AsyncExitStack, database_url: str, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """`gateway serve` before the echoing upstream, with `SECRET` as that provider's key."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", echo)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    exit_stack.push_async_callback(upstream.close)
    config = settings_dict(
        {"echo": str(upstream.make_url("")).rstrip("/")}, extra={"database": {"url": database_url}}
    )
    config["providers"][0]["api_key"] = SECRET
    process = await start_gateway_process(config, tmp_path)
    yield process
    process.stop()


async def ask(gateway: GatewayProcess, **fields: object) -> tuple[int, str]:
    """POST a chat request; its status and the whole answer (headers and body) as text."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions",
            json={**chat_body(), **fields},
            headers={"Authorization": f"Bearer {TEST_KEY}"},
        ) as response,
    ):
        body = await response.read()
        return response.status, f"{list(response.headers.items())}\n{body.decode()}"


@pytest.mark.parametrize(
    "fields",
    [{}, {"stream": True}, {"messages": [{"role": "user", "content": "error"}]}],
    ids=["answer", "stream", "error"],
)
async def test_no_form_of_an_echoed_credential_reaches_the_client(
    gateway: GatewayProcess, fields: dict[str, object]
) -> None:
    """The upstream echoes its credential as sent, `\\u`-escaped and base64 (three alignments,
    both alphabets): the client gets the answer with `[redacted]` and none of those forms."""
    status, answer = await ask(gateway, **fields)
    assert status == (400 if "messages" in fields else 200)
    assert "[redacted]" in answer
    assert [form for form in FORMS if form.lower() in answer.lower()] == []
    assert "4f9a1c77e0" not in answer
