"""Error answers and the headers every answer carries.

Every error becomes OpenAI-shaped JSON (an unhandled exception a logged 500 `internal_error`,
aiohttp's own 404/405/413 their gateway codes), framed as the connection's writer already is;
every response carries the gateway's `x-request-id` and a `Server` header without a version.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web

from gateway.edge.connections import SERVER_NAME
from gateway.edge.requestid import request_id_of
from gateway.shared.errors import GatewayError, error_response, let_go

# The log line keeps the composition root's logger name it had before the split.
logger = structlog.get_logger("gateway.app")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes OpenAI-shaped JSON; every response carries `x-request-id`."""
    request_id = request_id_of(request)
    headers = {"x-request-id": request_id}
    try:
        response = await handler(request)
    except GatewayError as error:
        let_go(error)
        return _framed_as_begun(request, error.to_response(headers))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _framed_as_begun(request, _http_error(error, headers))
    except Exception as error:
        logger.exception("unhandled_error", request_id=request_id, path=request.path)
        let_go(error)
        failed = error_response(
            500, "The gateway failed to handle this request.", "internal_error", headers=headers
        )
        return _framed_as_begun(request, failed)
    if not response.prepared:
        response.headers["x-request-id"] = request_id
    return response


def _framed_as_begun(request: web.Request, response: web.Response) -> web.Response:
    """An error answer framed as the connection's writer already is: a streamed response that
    failed in `prepare` (a head aiohttp would not write) left it chunked, so the error goes out
    chunked too and its head says so (a `Content-Length` over chunks desyncs the client)."""
    if getattr(request.writer, "chunked", False):
        response.enable_chunked_encoding()
    return response


def _http_error(error: web.HTTPException, headers: dict[str, str]) -> web.Response:
    status = error.status
    if status == 404:
        return error_response(404, "Unknown path.", "not_found", headers=headers)
    if status == 405:
        allowed = error.headers.get("Allow", "")
        return error_response(
            405,
            "Method not allowed on this path.",
            "method_not_allowed",
            headers={**headers, "Allow": allowed},
        )
    if status == 413:
        return error_response(
            413, "The request body is too large.", "body_too_large", headers=headers
        )
    return error_response(status, error.reason, f"http_{status}", headers=headers)


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries the gateway's `x-request-id`, streams included, and a `Server`
    header without a version."""
    response.headers["x-request-id"] = request_id_of(request)
    response.headers["Server"] = SERVER_NAME
