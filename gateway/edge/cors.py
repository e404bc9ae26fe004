"""CORS for browser clients: off unless `server.cors_allow_origins` lists origins (or `*`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from gateway.shared.errors import error_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
EXPOSED_HEADERS = ", ".join(
    (
        "x-request-id",
        "x-gateway-provider",
        "x-gateway-affinity",
        "x-gateway-resolved-model",
        "x-gateway-error",
        "x-upstream-request-id",
        "x-upstream-processing-ms",
        "x-ratelimit-limit-concurrency",
        "x-ratelimit-remaining-concurrency",
        "retry-after",
        "traceparent",
        "tracestate",
    )
)
PREFLIGHT_MAX_AGE_SECONDS = "600"


class Cors:
    """Which origins may call the gateway from a browser, and the headers that tell them so."""

    def __init__(self, origins: Sequence[str]) -> None:
        self._any = "*" in origins
        self._origins = frozenset(origins)

    def allow_origin(self, origin: str | None) -> str | None:
        """The `Access-Control-Allow-Origin` value for `origin`, or None when it is not allowed."""
        if not origin:
            return None
        if self._any:
            return "*"
        return origin if origin in self._origins else None

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer preflights (no key needed); every other request goes on."""
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        allowed = self.allow_origin(request.headers.get("Origin"))
        if allowed is None:
            return error_response(
                403, "This origin may not call the gateway.", "cors_origin_not_allowed"
            )
        headers = {
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": request.headers.get(
                "Access-Control-Request-Headers", "authorization, content-type"
            ),
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_SECONDS,
        }
        return web.Response(status=204, headers=headers)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Add the CORS headers to every answer (streams and errors included) for an allowed
        origin."""
        allowed = self.allow_origin(request.headers.get("Origin"))
        if allowed is None:
            return
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        if allowed != "*":
            response.headers.add("Vary", "Origin")
