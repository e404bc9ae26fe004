"""What `/admin/status` shows: this worker's view of its providers, store and recent requests."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from affinity_store.store import StoreError
from affinity_store.usage import UsageStore
from gateway.dispatch.memory_budget import USES
from gateway.operations.cluster_view import ClusterSection, collect_cluster
from gateway.operations.usage_view import UsageSection, collect_usage
from gateway.shared.decisions import RecentDecision

if TYPE_CHECKING:
    from gateway.operations.runtime import Runtime

STATUS_STORE_TIMEOUT_SECONDS = 0.5


@dataclass(frozen=True)
class ProviderRow:
    """One provider as this worker sees it; never its credential."""

    name: str
    routing_identity: str
    cooling_seconds: float
    in_flight: int
    load: float
    load_polled: bool
    bands: Mapping[str, int]  # model → latency band
    live_bindings: int | None  # bindings on its routing identity; None when the store is down
    draining: bool = False
    # Failing, but its cooldown was withheld by `routing.max_cooling_fraction`.
    cooldown_withheld: bool = False
    latency_source: str = "none"  # node (its own metrics), own (this worker's samples), none
    latency_age_seconds: float | None = None


@dataclass(frozen=True)
class KeyShareRow:
    """This worker's share of one key's cluster-wide limit (by key id, never the key)."""

    key_id: str
    limit_name: str  # max_concurrency | requests_per_minute
    limit: int
    share: int
    in_flight: int


@dataclass(frozen=True)
class OverloadRow:
    """This worker's load: whether it is overloaded and refuses new requests now, and why."""

    enabled: bool  # load shedding on; off, the overload is only reported
    overloaded: bool
    delay_ms: float  # the smallest queueing delay over the last interval
    burst_ms: float  # the burst allowance: a queue within it is never refused
    level_ms: float  # while overloaded, requests that queued longer are refused
    shed: int  # requests refused since the worker started
    episodes: int  # times the worker became overloaded


@dataclass(frozen=True)
class MemoryRow:
    """This worker's memory budget for requests: its size, what is held, and the refusals."""

    budget_bytes: int
    key_share_bytes: int  # the most one key may hold
    held_bytes: int
    held_by_use: Mapping[str, int]  # request_body, upload_copy, answer
    refusals: int  # since the worker started


@dataclass(frozen=True)
class StatusSnapshot:
    """Everything the status page renders."""

    worker_pid: int
    generated_at: float  # Unix time
    store_circuit: str  # closed | open | half_open
    providers: Sequence[ProviderRow]
    decisions: Sequence[RecentDecision]
    refresh_seconds: int = 5
    config_digest: str = ""  # SHA-256 of the effective settings, secrets excluded
    config_loaded_at: float = 0.0  # Unix time
    restart_needed: tuple[str, ...] = ()  # changed in the file, applied only by a restart
    key_shares: Sequence[KeyShareRow] = ()
    cluster_workers: int = 1  # live workers sharing the key limits, as last heard
    overload: OverloadRow | None = None  # None: no load shedder (a state built by hand)
    usage: UsageSection | None = None  # None: usage accounting is off
    cluster: ClusterSection | None = None  # None: not asked for (a snapshot built by hand)
    memory: MemoryRow | None = None  # None: no memory budget (a proxy built by hand)


async def collect_status(
    runtime: Runtime,
    decisions: Sequence[RecentDecision],
    usage_store: UsageStore | None = None,
    worker_id: str | None = None,
) -> StatusSnapshot:
    """Gather the snapshot; the binding counts, the last hour's usage and the live workers
    (with `worker_id`, this worker's id in the store) are the only I/O, each bounded and
    optional."""
    router = runtime.router
    catalog = runtime.catalog
    identities = {provider.routing_identity for provider in catalog.providers.values()}
    counts: Mapping[str, int] | None
    try:
        counts = await router.affinity.store.count_bindings(
            identities, timeout=STATUS_STORE_TIMEOUT_SECONDS
        )
    except StoreError:
        counts = None
    now = time.monotonic()
    bands: dict[str, dict[str, int]] = {name: {} for name in catalog.providers}
    for model, providers in catalog.serving.items():
        for provider, band in router.bands(model, [p.name for p in providers], now).items():
            bands[provider][model] = band
    sources = {name: router.latency_source(name, now) for name in catalog.providers}
    rows = [
        ProviderRow(
            name=provider.name,
            routing_identity=provider.routing_identity,
            cooling_seconds=round(router.health.cooling_remaining(provider.name), 1),
            in_flight=router.permits.in_flight(provider.name),
            load=router.load(provider.name),
            load_polled=router.load_is_polled(provider.name),
            bands=bands[provider.name],
            live_bindings=None if counts is None else counts.get(provider.routing_identity, 0),
            draining=provider.draining,
            cooldown_withheld=router.health.withholding(provider.name),
            latency_source=sources[provider.name][0],
            latency_age_seconds=sources[provider.name][1],
        )
        for provider in catalog.providers.values()
    ]
    key_limits = runtime.proxy.key_limits
    shares = [
        KeyShareRow(key_id, limit_name, limit, share, key_limits.in_flight_by_id(key_id))
        for (key_id, limit_name), (share, limit) in sorted(key_limits.shares.snapshot().items())
    ]
    usage, cluster = await _usage_and_cluster(runtime, usage_store, worker_id)
    shedder = runtime.proxy.shedder
    overload = (
        None
        if shedder is None
        else OverloadRow(
            enabled=shedder.policy.enabled,
            overloaded=shedder.overloaded,
            delay_ms=round(shedder.delay * 1000, 1),
            burst_ms=shedder.policy.burst * 1000,
            level_ms=shedder.policy.level * 1000,
            shed=shedder.shed,
            episodes=shedder.episodes,
        )
    )
    budget = runtime.proxy.memory_budget
    memory = (
        None
        if budget is None
        else MemoryRow(
            budget_bytes=budget.limit,
            key_share_bytes=budget.key_limit,
            held_bytes=budget.held,
            held_by_use={use: budget.held_for(use) for use in USES},
            refusals=sum(budget.refusals.values()),
        )
    )
    return StatusSnapshot(
        worker_pid=os.getpid(),
        generated_at=time.time(),
        store_circuit=router.affinity.breaker.state(),
        providers=rows,
        decisions=list(reversed(decisions)),
        config_digest=runtime.digest,
        config_loaded_at=runtime.loaded_at,
        restart_needed=runtime.restart_needed,
        key_shares=shares,
        cluster_workers=key_limits.shares.workers,
        overload=overload,
        usage=usage,
        cluster=cluster,
        memory=memory,
    )


async def _usage_and_cluster(
    runtime: Runtime, usage_store: UsageStore | None, worker_id: str | None
) -> tuple[UsageSection | None, ClusterSection | None]:
    """The page's cluster-wide reads, side by side, each within the status timeout."""

    async def usage() -> UsageSection | None:
        if usage_store is None:
            return None
        return await collect_usage(usage_store, timeout=STATUS_STORE_TIMEOUT_SECONDS)

    async def cluster() -> ClusterSection | None:
        if worker_id is None:
            return None
        store = runtime.router.affinity.store
        return await collect_cluster(store, worker_id, timeout=STATUS_STORE_TIMEOUT_SECONDS)

    return await asyncio.gather(usage(), cluster())
