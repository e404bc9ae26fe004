"""The `/sim/*` control endpoints tests use to inject faults and read what the node saw."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.simulator.openai_shapes import JSON_CONTENT_TYPE, error_body
from gateway.simulator.options import refuse_seconds_from
from gateway.simulator.state import STATE_KEY


def _json(payload: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type=JSON_CONTENT_TYPE)


def _bad_request(message: str) -> web.Response:
    return web.Response(
        status=400,
        body=error_body(message, "invalid_request_error", None),
        content_type=JSON_CONTENT_TYPE,
    )


async def get_faults(request: web.Request) -> web.Response:
    """`GET /sim/faults`: the current faults."""
    return _json(request.app[STATE_KEY].faults.to_json())


async def post_faults(request: web.Request) -> web.Response:
    """`POST /sim/faults`: apply a partial update; `refuse_seconds` also refuses connections.

    The port is closed before the answer leaves, so once the caller has its 200 every new
    connection is refused; the caller's own connection closes after the answer.
    """
    state = request.app[STATE_KEY]
    try:
        changes = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _bad_request("the body is not valid JSON")
    if not isinstance(changes, dict):
        return _bad_request("the body must be a JSON object")
    refuse_seconds: float | None = None
    try:
        if "refuse_seconds" in changes:
            refuse_seconds = refuse_seconds_from(changes.pop("refuse_seconds"))
        faults = state.faults.updated(changes)
    except ValueError as error:
        return _bad_request(str(error))
    if refuse_seconds is not None and state.refuse is None:
        return _bad_request("refuse_seconds needs a node started by SimulatorServer")
    state.apply_faults(faults)
    response = _json(faults.to_json())
    if refuse_seconds is not None and state.refuse is not None:
        response.force_close()
        await state.refuse(refuse_seconds, request.transport)
    return response


async def get_stats(request: web.Request) -> web.Response:
    """`GET /sim/stats`: counters, peaks and the recent requests."""
    return _json(request.app[STATE_KEY].stats.to_json())


async def post_reset(request: web.Request) -> web.Response:
    """`POST /sim/reset`: zero the stats; `{"clear_cache": true}` also empties the prefix cache."""
    state = request.app[STATE_KEY]
    body = await request.read()
    clear_cache = False
    if body.strip():
        try:
            options = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _bad_request("the body is not valid JSON")
        clear_cache = isinstance(options, dict) and options.get("clear_cache") is True
    if clear_cache:
        state.engine.cache.clear()
    state.stats.reset()
    return _json({"reset": True, "cache_cleared": clear_cache})
