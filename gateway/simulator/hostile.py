"""Answers of a broken upstream, one per hostile mode, for the gateway's robustness tests.

- `invalid_json`: status 200 with the expected content type but a body that is not JSON
  (for streams: `data:` events that are not JSON, then `[DONE]`).
- `wrong_content_type`: status 200 with `text/html` and an HTML page.
- `malformed_sse`: status 200 with `text/event-stream` (also for non-streaming requests) and a
  body that breaks SSE framing: lines without a field name, an unterminated event, no `[DONE]`.
- `endless_body`: status 200, then garbage bytes without end until the client goes away.
- `hang_after_headers`: status 200 and headers, then nothing until the client goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from aiohttp import web

from gateway.simulator.openai_shapes import JSON_CONTENT_TYPE, SSE_CONTENT_TYPE
from gateway.simulator.options import Mode

ENDLESS_PIECE = b"garbage " * 8192


def fixed_hostile_response(
    mode: Mode, stream: bool, headers: Mapping[str, str]
) -> web.Response | None:
    """The complete broken answer of `mode`, or None when the mode never finishes its body."""
    if mode is Mode.INVALID_JSON:
        if stream:
            body = b'data: {"id": "chatcmpl-broken", "choices": [\n\n' * 3 + b"data: [DONE]\n\n"
            return web.Response(body=body, content_type=SSE_CONTENT_TYPE, headers=headers)
        body = b'{"id": "chatcmpl-broken", "object": "chat.completion", "choices": ['
        return web.Response(body=body, content_type=JSON_CONTENT_TYPE, headers=headers)
    if mode is Mode.WRONG_CONTENT_TYPE:
        body = b"<html><body><h1>Welcome</h1><p>This is not an API.</p></body></html>"
        return web.Response(body=body, content_type="text/html", headers=headers)
    if mode is Mode.MALFORMED_SSE:
        body = (
            b"this line has no field name\n"
            b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {"content": "half'
            b"\nevent: message\nretry: soon\n"
            b"data:no-json-here\n"
        )
        return web.Response(body=body, content_type=SSE_CONTENT_TYPE, headers=headers)
    return None


async def continue_hostile_body(response: web.StreamResponse, mode: Mode) -> None:
    """After the headers of `response` went out, never finish: send garbage or nothing at all.

    Returns only by raising: CancelledError or ConnectionError once the client goes away.
    """
    if mode is Mode.ENDLESS_BODY:
        while True:
            await response.write(ENDLESS_PIECE)
            # Yield even when the reader keeps up, so the node keeps serving other requests.
            await asyncio.sleep(0)
    await asyncio.get_running_loop().create_future()
