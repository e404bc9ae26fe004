"""`create_app(settings)`: routes, middlewares, and one cleanup context per resource."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from affinity_store.memory import MemoryAffinityStore
from affinity_store.notifications import BindingChanges
from affinity_store.postgres import Pool, PostgresAffinityStore
from affinity_store.store import AffinityStore
from affinity_store.usage import MemoryUsageStore, PostgresUsageStore, UsageStore
from gateway.catalog import Catalog, Key
from gateway.config import Settings
from gateway.dispatch.cluster_shares import ClusterShares
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.key_shares import ShareBook, Unit
from gateway.dispatch.load import LoadPoller
from gateway.dispatch.memory_budget import MemoryBudget
from gateway.dispatch.model_cards import ModelCards
from gateway.dispatch.permits import KeyLimits, ProviderPermits
from gateway.dispatch.retries import RetryBudget
from gateway.dispatch.upstream import create_client_session
from gateway.dispatch.upstream_pool import UpstreamPool
from gateway.dispatch.usage_book import UsageBook, UsageFlusher
from gateway.edge.body_parse import close_pool
from gateway.edge.connections import SERVER_NAME
from gateway.edge.cors import Cors
from gateway.edge.endpoints import ENDPOINTS, EndpointSpec
from gateway.edge.openapi import OpenApiEndpoint
from gateway.edge.overload import LoadShedder, OverloadGate, SheddingPolicy
from gateway.edge.requestid import REQUEST_IDS, RequestIds, request_id_of
from gateway.edge.uploads import live_uploads
from gateway.operations import admin
from gateway.operations.cluster_view import describe_worker
from gateway.operations.reload import Reloader
from gateway.operations.runtime import Lifecycle, ProcessState, RuntimeHolder, build_runtime
from gateway.operations.status import collect_status
from gateway.operations.status_page import render_status
from gateway.operations.usage_view import admin_usage as read_usage
from gateway.selection.affinity import SharedAffinity
from gateway.selection.database import database_url, describe_database, open_pool
from gateway.selection.router import RouterMemory
from gateway.shared.background import every, stop_task
from gateway.shared.errors import GatewayError, error_body, error_response
from gateway.shared.metrics import Metrics, exposition

logger = structlog.get_logger("gateway.app")

SETTINGS = web.AppKey("settings", Settings)
CATALOG = web.AppKey("catalog", Catalog)
METRICS = web.AppKey("metrics", Metrics)
CLIENT_SESSION = web.AppKey("client_session", aiohttp.ClientSession)
RUNTIME = web.AppKey("runtime", RuntimeHolder)
RELOADER = web.AppKey("reloader", Reloader)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
STORE = web.AppKey("store", AffinityStore)
AFFINITY = web.AppKey("affinity", SharedAffinity)
LOAD = web.AppKey("load", LoadPoller)
# Where each request meets the load shedder, before the app (see `gateway.edge.overload`).
OVERLOAD_GATE = web.AppKey("overload_gate", OverloadGate)
SHARES = web.AppKey("shares", ClusterShares)
USAGE_STORE = web.AppKey("usage_store", UsageStore)
USAGE_BOOK = web.AppKey("usage_book", UsageBook)
METRICS_DIRECTORY = web.AppKey("metrics_directory", str)
GAUGE_REFRESH_SECONDS = 1.0
WARM_UP_SECONDS = 10.0

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
    app.on_response_prepare.append(_add_request_id)
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
    app.on_cleanup.append(_close_parser)

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


async def store_context(app: web.Application) -> AsyncIterator[None]:
    """The affinity store (a pool when it is Postgres) and the background work around it."""
    settings = app[SETTINGS]
    pool: Pool | None = None
    url = database_url(settings)
    if STORE not in app:
        if url is None:
            logger.warning("no_database", detail="bindings are kept per process only")
            app[STORE] = MemoryAffinityStore()
        else:
            logger.info("affinity_store", pid=os.getpid(), **describe_database(url))
            pool = await open_pool(settings)
            store = PostgresAffinityStore(pool)
            # Before serving: a burst of first requests must not wait for connections.
            ready = await store.warm_up(settings.database.pool_max_size, timeout=WARM_UP_SECONDS)
            logger.info("affinity_store_pool_ready", pid=os.getpid(), connections=ready)
            app[STORE] = store
    affinity = SharedAffinity(
        app[STORE],
        settings.affinity,
        app[METRICS],
        connections=None if pool is None else settings.database.pool_max_size,
    )
    app[AFFINITY] = affinity
    changes: BindingChanges | None = None
    if pool is not None and url is not None:
        listen_url = settings.database.listen_url
        changes = BindingChanges(
            listen_url.get_secret_value() if listen_url else url, pool, affinity.changed
        )
        await changes.start()
        affinity.follow(changes)
    await affinity.start()
    flusher = _usage_flusher(app, pool)
    if flusher is not None:
        await flusher.start()
    yield
    if flusher is not None:
        await flusher.stop()  # its last flush, on the pool still open
    await affinity.stop()
    if changes is not None:
        await changes.stop()
    if pool is not None:
        await pool.close()


def _usage_flusher(app: web.Application, pool: Pool | None) -> UsageFlusher | None:
    """The worker's usage book (reached by requests through the process state) and the flusher
    that adds it to the store; None with `usage.enabled: false`."""
    usage = app[SETTINGS].usage
    if not usage.enabled:
        return None
    if USAGE_STORE not in app:
        app[USAGE_STORE] = PostgresUsageStore(pool) if pool is not None else MemoryUsageStore()
    book = UsageBook(usage.max_pending_rows)
    app[USAGE_BOOK] = book
    return UsageFlusher(app[USAGE_STORE], book, usage)


async def _close_parser(app: web.Application) -> None:
    """Stop the body parser's helper process, if a body needed it."""
    close_pool()


async def client_session_context(app: web.Application) -> AsyncIterator[None]:
    """The upstream clients (the proxied requests' pool, the load poller's session), the learnt
    state, and the first runtime on them."""
    settings = app[SETTINGS]
    catalog = app[CATALOG]
    metrics = app[METRICS]
    session = create_client_session(settings.routing)
    app[CLIENT_SESSION] = session
    client = UpstreamPool()
    permits = ProviderPermits(catalog.providers)
    poller = LoadPoller(
        session,
        catalog.providers,
        permits.in_flight,
        interval=settings.routing.load_poll_interval_seconds,
        ttft_window_seconds=settings.routing.node_latency_window_seconds,
    )
    app[LOAD] = poller
    # Until the store grants shares, each key's limits are split among this replica's workers.
    key_limits = KeyLimits(shares=ShareBook(workers=settings.server.workers))
    shedder = _shedder(settings, metrics)
    state = ProcessState(
        metrics=metrics,
        affinity=app[AFFINITY],
        store=app[STORE],
        client=client,
        health=ProviderHealth(
            settings.routing,
            on_withheld=lambda provider: metrics.cooldowns_withheld.labels(provider).inc(),
        ),
        permits=permits,
        poller=poller,
        memory=RouterMemory.fresh(settings.routing),
        memory_budget=MemoryBudget(
            settings.server.memory_budget_bytes,
            settings.server.memory_share_per_key,
            settings.routing.wait_timeout_seconds,
            on_refusal=lambda use, reason: metrics.memory_refusals.labels(use, reason).inc(),
        ),
        retries=RetryBudget(
            settings.routing,
            key_limits.in_flight_total,
            on_retry=metrics.retries.inc,
            on_refused=lambda reason: metrics.retries_refused.labels(reason).inc(),
        ),
        key_limits=key_limits,
        shedder=shedder,
        usage_book=app.get(USAGE_BOOK),
        model_cards=ModelCards(session),
    )
    holder = RuntimeHolder(build_runtime(settings, state))
    app[RUNTIME] = holder

    def light(request: web.BaseRequest) -> bool:
        # Whatever the latest reload made it.
        return holder.current.proxy.admission.is_light(request)

    app[OVERLOAD_GATE] = OverloadGate(
        shedder, router=app.router, light=light, request_id=app[REQUEST_IDS].new
    )
    app[RELOADER] = Reloader(holder, state, metrics)

    def current_keys() -> Iterable[Key]:
        return holder.current.catalog.keys.values()  # whatever the latest reload made them

    lifecycle = app[LIFECYCLE]

    def snapshot() -> dict[str, Any]:
        runtime = holder.current
        health = runtime.router.health
        return describe_worker(
            in_flight=key_limits.in_flight_total(),
            shedding=shedder.overloaded,
            cooling=[name for name in runtime.catalog.providers if health.cooling(name)],
            config_digest=runtime.digest,
            draining=lifecycle.draining,
        )

    def unit_claimed(outcome: Unit, seconds: float) -> None:
        metrics.key_units.labels(outcome.value).observe(seconds)

    shares = ClusterShares(
        app[STORE],
        key_limits.shares,
        keys=current_keys,
        in_flight=key_limits.in_flight_by_id,
        snapshot=snapshot,
        unit_timeout=settings.affinity.claim_timeout_ms / 1000,
        on_unit=unit_claimed,
    )
    key_limits.units = shares
    key_limits.on_refused = lambda reason: metrics.key_limit_refusals.labels(reason).inc()
    app[SHARES] = shares
    await shares.start()
    await poller.start()
    refresher = asyncio.create_task(
        _refresh_gauges(holder, shedder, state.memory_budget, metrics), name="gauge-refresher"
    )
    yield
    await stop_task(refresher)
    await shares.stop()
    await poller.stop()
    await client.close()
    await session.close()


def _shedder(settings: Settings, metrics: Metrics) -> LoadShedder:
    """The worker's load shedder; with `server.load_shedding` off it measures and refuses
    nothing."""
    server = settings.server
    policy = SheddingPolicy(burst=server.load_shedding_burst_seconds, enabled=server.load_shedding)
    return LoadShedder(
        policy, on_shed=metrics.requests_shed.inc, on_interval=metrics.queue_delay.set
    )


async def _refresh_gauges(
    holder: RuntimeHolder, shedder: LoadShedder, budget: MemoryBudget, metrics: Metrics
) -> None:
    # Each worker keeps its own state gauges current, so a scrape answered by any worker
    # (multiprocess mode) sees all of them; an idle worker's queue delay settles to 0.
    def held(use: str, size: int) -> None:
        metrics.memory_held.labels(use).set(size)

    async def refresh() -> None:
        holder.current.router.publish_gauges()
        shedder.tick()
        budget.publish(metrics.memory_budget.set, held)
        metrics.live_uploads.set(live_uploads())
        # After the gauges: what a request gave back is freed by now (see dispatch/allocator).
        budget.trimmer.settle(budget.held)

    await every("gauge-refresher", refresh, interval=GAUGE_REFRESH_SECONDS)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes OpenAI-shaped JSON; every response carries `x-request-id`."""
    request_id = request_id_of(request)
    headers = {"x-request-id": request_id}
    try:
        response = await handler(request)
    except GatewayError as error:
        return _framed_as_begun(request, error.to_response(headers))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _framed_as_begun(request, _http_error(error, headers))
    except Exception:
        logger.exception("unhandled_error", request_id=request_id, path=request.path)
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


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries the gateway's `x-request-id`, streams included, and a `Server`
    header without a version."""
    response.headers["x-request-id"] = request_id_of(request)
    response.headers["Server"] = SERVER_NAME


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
    """Readiness: not draining, and at least one provider not cooling; the store may be down."""
    runtime = request.app[RUNTIME].current
    health = runtime.router.health
    reason = None
    if request.app[LIFECYCLE].draining:
        reason = "this worker is draining before it stops"
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
