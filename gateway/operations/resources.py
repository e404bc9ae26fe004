"""The worker's resources, one aiohttp cleanup context each, and the background work around them.

`store_context`: the affinity store (a warmed Postgres pool, or memory with a warning), the
shared affinity and its change feed, and the usage flusher; stopped in reverse order.
`client_session_context`: the upstream clients, the process state learnt across reloads, the
first runtime on them, the load shedder's gate, the cluster shares and the gauge refresher.
`close_parser` stops the body parser's helper process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable
from typing import Any

import structlog
from aiohttp import web

from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.notifications import BindingChanges
from affinity_store.postgres import Pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.usage import MemoryUsageStore, PostgresUsageStore
from gateway.catalog import Key
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
from gateway.edge.overload import LoadShedder, OverloadGate, SheddingPolicy
from gateway.edge.requestid import REQUEST_IDS
from gateway.edge.uploads import live_uploads
from gateway.operations.app_keys import (
    AFFINITY,
    CATALOG,
    CLIENT_SESSION,
    LIFECYCLE,
    LOAD,
    METRICS,
    OVERLOAD_GATE,
    RELOADER,
    RUNTIME,
    SETTINGS,
    SHARES,
    STORE,
    USAGE_BOOK,
    USAGE_STORE,
)
from gateway.operations.cluster_view import describe_worker
from gateway.operations.reload import Reloader
from gateway.operations.runtime import ProcessState, RuntimeHolder, build_runtime
from gateway.selection.affinity import SharedAffinity
from gateway.selection.database import database_url, describe_database, open_pool
from gateway.selection.router import RouterMemory
from gateway.shared.background import every, stop_task
from gateway.shared.metrics import Metrics

# The log lines keep the composition root's logger name they had before the split.
logger = structlog.get_logger("gateway.app")

GAUGE_REFRESH_SECONDS = 1.0
WARM_UP_SECONDS = 10.0


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


async def close_parser(app: web.Application) -> None:
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
