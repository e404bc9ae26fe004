"""OpenAI-shaped errors: `{"error": {"message", "type", "code"}}` on every error path."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

ERROR_TYPES: Mapping[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class GatewayError(Exception):
    """An error the gateway answers, with its status, message and machine-readable code; with
    `body`, the answer is that body (an upstream's own error, relayed) and `message` only the
    gateway's summary for its log and `x-gateway-error` header."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        *,
        retry_after: float | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.retry_after = retry_after
        self.param = param
        self.headers = dict(headers or {})
        self.body = body
        self.content_type = content_type

    def to_response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        """The response for this error (OpenAI-shaped JSON, or the relayed body as it came),
        with `Retry-After` when known."""
        if self.body is not None:
            response = web.Response(
                status=self.status, body=self.body, headers={**self.headers, **(headers or {})}
            )
            if self.content_type is not None:
                response.headers["Content-Type"] = self.content_type
            else:
                response.headers.pop("Content-Type", None)
            if self.retry_after is not None:
                response.headers["Retry-After"] = retry_after_value(self.retry_after)
            return response
        return error_response(
            self.status,
            self.message,
            self.code,
            retry_after=self.retry_after,
            param=self.param,
            headers={**self.headers, **(headers or {})},
        )


def error_body(status: int, message: str, code: str, param: str | None = None) -> bytes:
    """The serialized OpenAI error object."""
    error_type = ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


def error_response(
    status: int,
    message: str,
    code: str,
    *,
    retry_after: float | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped JSON error response."""
    response = web.Response(
        status=status,
        body=error_body(status, message, code, param),
        content_type="application/json",
        headers=headers,
    )
    if retry_after is not None:
        response.headers["Retry-After"] = retry_after_value(retry_after)
    return response


def retry_after_value(seconds: float) -> str:
    """`Retry-After` in whole seconds, rounded up, at least 1."""
    return str(max(1, int(seconds + 0.999)))


def sse_error_event(message: str, code: str) -> bytes:
    """The OpenAI-style error of a stream that broke after it started, as a last `data:` line
    left unterminated (no blank line after it): the transfer is then aborted. Whoever reads the
    bytes (curl, a log) sees why; an SSE parser, which dispatches an event only at its blank
    line, reports the broken connection instead — the OpenAI SDK raises `APIConnectionError`,
    as it does when a node's stream breaks directly, so retry logic keyed on it still works."""
    payload = orjson.dumps(
        {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    )
    return b"data: " + payload + b"\n"


def is_utf8(text: str) -> bool:
    """Whether a header value decoded to real text (not bytes smuggled in as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def let_go(error: BaseException) -> None:
    """Drop the tracebacks of `error` and of the errors it was raised from or during, where a
    handled error's life ends.

    A frame that holds the error it raised (`failure = ...; raise failure`) and the error's
    traceback, which holds the frame, make a cycle: reference counting never frees it, and a
    garbage collection may come seconds later, under load much later. Every object those frames
    refer to waits with it (a failed upload's source and its copy, a request and its buffers).
    Without the traceback the frames go with their last reference. (Clearing the frames instead
    would also stop a coroutine that caught the same error and is still suspended.)
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        pending += (current.__cause__, current.__context__)
