"""The floor of a Python proxy: a bare aiohttp pass-through on uvloop, for `bench throughput`.

Run: `python -m bench.passthrough --port 9001 --upstream http://127.0.0.1:9000`. Every POST is
sent to the same path upstream over one pooled session; the answer is relayed chunk by chunk with
its status and content type. No routing, auth, logging or metrics: what the gateway adds shows as
the difference between the two.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator

import uvloop
from aiohttp import ClientSession, TCPConnector, web

UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
SESSION: web.AppKey[ClientSession] = web.AppKey("session", ClientSession)


async def relay(request: web.Request) -> web.StreamResponse:
    """Forward the body upstream and stream the answer back."""
    session = request.app[SESSION]
    body = await request.read()
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with session.post(request.app[UPSTREAM] + request.path, data=body, headers=headers) as up:
        response = web.StreamResponse(status=up.status)
        response.content_type = up.content_type
        await response.prepare(request)
        async for chunk in up.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_context(app: web.Application) -> AsyncIterator[None]:
    """One pooled client session for the app's lifetime."""
    async with ClientSession(connector=TCPConnector(limit=0)) as session:
        app[SESSION] = session
        yield


def main() -> int:
    """Parse the flags and serve on uvloop."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:9000")
    options = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = options.upstream.rstrip("/")
    app.cleanup_ctx.append(session_context)
    app.router.add_post("/{tail:.*}", relay)
    web.run_app(
        app,
        host="127.0.0.1",
        port=options.port,
        print=None,
        access_log=None,
        loop=uvloop.new_event_loop(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
