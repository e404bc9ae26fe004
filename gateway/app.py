"""`create_app(settings)`: the gateway application for one worker: its routes and their handlers
(proxied endpoints, the model list, probes, admin, metrics), with the error middleware, the
response hooks and the resources' cleanup contexts attached."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from affinity_store.store import AffinityStore
from affinity_store.usage import UsageStore
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.edge.cors import Cors
from gateway.edge.endpoints import ENDPOINTS, EndpointSpec
from gateway.edge.error_middleware import add_request_id, error_middleware
from gateway.edge.openapi import OpenApiEndpoint
from gateway.edge.requestid import REQUEST_IDS, RequestIds
from gateway.operations import admin
from gateway.operations.app_keys import (
    CATALOG,
    LIFECYCLE,
    METRICS,
    METRICS_DIRECTORY,
    RUNTIME,
    SETTINGS,
    SHARES,
    STORE,
    USAGE_STORE,
)
from gateway.operations.resources import client_session_context, close_parser, store_context
from gateway.operations.runtime import Lifecycle
from gateway.operations.status import collect_status
from gateway.operations.status_page import render_status
from gateway.operations.usage_view import admin_usage as read_usage
from gateway.shared.errors import error_body
from gateway.shared.metrics import Metrics, exposition

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    settings: Settings,
    *,
    metrics: Metrics | None = None,
    store: AffinityStore | None = None,
    metrics_directory: str | None = None,
    usage_store: UsageStore | None = None,
) -> web.Application:
    """The gateway application for one worker process.

    Bindings go to `store` when given, else to the Postgres at `database.url`; with neither,
    they stay in this process (a warning says so). Usage rollups go to `usage_store` when
    given, else to the same Postgres, else to memory. `metrics_directory` is set when several
    workers share their metrics (see `gateway.shared.metrics`).
    """
    cors = Cors(settings.server.cors_allow_origins) if settings.server.cors_allow_origins else None
    app = web.Application(
        middlewares=[error_middleware] + ([cors.middleware] if cors is not None else []),
        client_max_size=settings.server.max_body_bytes,
    )
    app.on_response_prepare.append(add_request_id)
    if cors is not None:
        app.on_response_prepare.append(cors.on_prepare)
    app[SETTINGS] = settings
    app[CATALOG] = Catalog(settings)
    app[LIFECYCLE] = Lifecycle()
    app[REQUEST_IDS] = RequestIds()
    app.on_response_prepare.append(_close_while_draining)
    app[METRICS] = metrics or Metrics()
    if store is not None:
        app[STORE] = store
    if metrics_directory is not None:
        app[METRICS_DIRECTORY] = metrics_directory
    if usage_store is not None:
        app[USAGE_STORE] = usage_store
    app.cleanup_ctx.append(store_context)
    app.cleanup_ctx.append(client_session_context)
    app.on_cleanup.append(close_parser)

    for spec in ENDPOINTS:
        app.router.add_route(
            spec.method, spec.path, _endpoint(spec), expect_handler=expect_continue
        )
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", OpenApiEndpoint().serve)
    if settings.server.metrics_port is None:
        app.router.add_get("/metrics", metrics_endpoint)
    # Always routed: whether a token is set (and which) is read per request, so a reload applies.
    app.router.add_get("/admin/bindings", admin_bindings)
    app.router.add_get("/admin/status", admin_status)
    app.router.add_get("/admin/usage", admin_usage)
    return app


async def _close_while_draining(request: web.Request, response: web.StreamResponse) -> None:
    """While draining, every answer closes its connection so load balancers stop reusing it."""
    if request.app[LIFECYCLE].draining:
        response.force_close()
        response.headers["Connection"] = "close"


def _endpoint(spec: EndpointSpec) -> Handler:
    async def proxied(request: web.Request) -> web.StreamResponse:
        # The runtime current when the request arrived serves it to its end.
        return await request.app[RUNTIME].proxy.proxy(request, spec)

    proxied.__doc__ = f"Proxy `{spec.method} {spec.path}`."
    return proxied


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """`Expect: 100-continue` on a proxied endpoint: checked before the body is asked for."""
    return await request.app[RUNTIME].proxy.admission.expect_continue(request)


async def models(request: web.Request) -> web.StreamResponse:
    """List the models the caller's key may use."""
    return await request.app[RUNTIME].proxy.model_list.models(request)


async def model(request: web.Request) -> web.StreamResponse:
    """One model the caller's key may use."""
    return await request.app[RUNTIME].proxy.model_list.model(request)


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers (with its pid, so multi-worker set-ups can be told apart)."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: not draining, every worker of the gateway listening, and at least one provider
    not cooling; the store may be down."""
    runtime = request.app[RUNTIME].current
    health = runtime.router.health
    reason = None
    if request.app[LIFECYCLE].draining:
        reason = "this worker is draining before it stops"
    elif not request.app[LIFECYCLE].every_worker_listening:
        reason = "not every worker of this gateway listens yet"
    elif all(health.cooling(name) for name in runtime.catalog.providers):
        reason = "every provider is cooling"
    if reason is not None:
        error = orjson.loads(error_body(503, f"Not ready: {reason}.", "not_ready"))["error"]
        return web.json_response(
            {"status": "not ready", "reason": reason, "error": error}, status=503
        )
    return web.json_response({"status": "ready"})


def _check_admin(request: web.Request) -> None:
    token = request.app[RUNTIME].current.settings.server.admin_token
    if token is None:
        raise web.HTTPNotFound  # no token configured: the admin endpoints do not exist
    admin.check_admin(request, token.get_secret_value())


async def admin_bindings(request: web.Request) -> web.Response:
    """`/admin/bindings` (admin token): the live shared bindings."""
    _check_admin(request)
    return await admin.bindings(request, request.app[STORE])


async def admin_status(request: web.Request) -> web.Response:
    """`/admin/status` (admin token): this worker's view, as a small auto-refreshing page."""
    _check_admin(request)
    runtime = request.app[RUNTIME].current
    snapshot = await collect_status(
        runtime,
        list(runtime.proxy.recent),
        request.app.get(USAGE_STORE),
        request.app[SHARES].worker_id,
    )
    return web.Response(
        text=render_status(snapshot),
        content_type="text/html",
        headers={"Cache-Control": "no-store"},
    )


async def admin_usage(request: web.Request) -> web.Response:
    """`/admin/usage?since=24h&by=key,model` (admin token): the cluster's usage rollups."""
    _check_admin(request)
    return await read_usage(request, request.app.get(USAGE_STORE))


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text: this worker's metrics, or every worker's in multi-worker mode."""
    return metrics_response(request.app)


def metrics_response(app: web.Application) -> web.Response:
    """The scrape answer for a gateway app."""
    if RUNTIME in app:
        app[RUNTIME].current.router.publish_gauges()
    body = exposition(app[METRICS], app.get(METRICS_DIRECTORY))
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def create_metrics_app(gateway: web.Application) -> web.Application:
    """A separate app serving only `/metrics` for `gateway`, for `server.metrics_port`."""
    metrics_app = web.Application()

    async def scrape(request: web.Request) -> web.Response:
        return metrics_response(gateway)

    metrics_app.router.add_get("/metrics", scrape)
    return metrics_app
