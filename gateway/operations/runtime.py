"""One worker's routing snapshot, swapped whole on reload, over state that lives as long as it.

A `Runtime` is immutable: the settings, the catalog built from them, and the proxy, router and
dispatcher that read them. A request takes the current runtime once, when it arrives, and uses it
to the end, so a reload never changes the rules under a request in flight. What the process has
learnt (cooldowns, latency samples, sessions, permits and in-flight counts, retries under way,
polled load, shared bindings) lives in `ProcessState` and carries over to every new runtime.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from affinity_store.store import AffinityStore
from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.dispatch.dispatcher import Dispatcher
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.load import LoadPoller
from gateway.dispatch.memory_budget import MemoryBudget
from gateway.dispatch.model_cards import ModelCards
from gateway.dispatch.permits import ConnectionShare, KeyLimits, ProviderPermits
from gateway.dispatch.retries import RetryBudget
from gateway.dispatch.upstream_pool import UpstreamPool
from gateway.dispatch.usage_book import UsageBook
from gateway.edge.overload import LoadShedder
from gateway.edge.proxy import Proxy
from gateway.edge.responses import ResponseBindings
from gateway.selection.affinity import SharedAffinity
from gateway.selection.router import Router, RouterMemory
from gateway.shared.decisions import RECENT_DECISIONS, RecentDecisions
from gateway.shared.metrics import Metrics


def settings_digest(settings: Settings) -> str:
    """SHA-256 of the effective settings (secret values excluded: they dump masked)."""
    return hashlib.sha256(settings.model_dump_json().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ProcessState:
    """What one worker keeps across reloads."""

    metrics: Metrics
    affinity: SharedAffinity
    store: AffinityStore
    client: UpstreamPool  # proxied requests' connections
    health: ProviderHealth
    permits: ProviderPermits
    poller: LoadPoller
    memory: RouterMemory
    retries: RetryBudget  # retries under way carry over; a reload sets the budget's share
    memory_budget: MemoryBudget
    key_limits: KeyLimits = field(default_factory=KeyLimits)
    shedder: LoadShedder | None = None  # None: only in tests that build a state by hand
    usage_book: UsageBook | None = None  # None: usage accounting is off
    model_cards: ModelCards | None = None  # None: model lists carry no node-reported fields
    recent: RecentDecisions = field(default_factory=lambda: RecentDecisions(RECENT_DECISIONS))
    # Fixed per process, so the random tiebreak between providers survives a reload.
    tiebreak_seed: int = field(default_factory=lambda: random.getrandbits(64))


@dataclass(frozen=True)
class Runtime:
    """One immutable snapshot of the config and the request path built on it."""

    settings: Settings
    catalog: Catalog
    proxy: Proxy
    digest: str
    loaded_at: float  # Unix time
    restart_needed: tuple[str, ...] = ()

    @property
    def router(self) -> Router:
        """The snapshot's router."""
        return self.proxy.router


class Lifecycle:
    """Where the worker is in its life: serving, or draining after SIGTERM (lame duck); and,
    under a supervisor, whether every worker of the gateway has started listening."""

    def __init__(self) -> None:
        self.draining = False
        # One flag per worker of a supervised gateway, shared between them: set once that
        # worker listens. None for a lone worker.
        self.workers_listening: Iterable[int] | None = None

    @property
    def every_worker_listening(self) -> bool:
        """Every worker of this gateway listens (always, for a lone worker)."""
        flags = self.workers_listening
        return flags is None or all(flags)


class RuntimeHolder:
    """The worker's current runtime; replacing it is one assignment, atomic on the event loop."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime

    @property
    def proxy(self) -> Proxy:
        """The current runtime's proxy."""
        return self.current.proxy


def build_runtime(
    settings: Settings, state: ProcessState, *, restart_needed: tuple[str, ...] = ()
) -> Runtime:
    """A runtime for these settings over the process's state, which is told the new providers."""
    catalog = Catalog(settings)
    routing = settings.routing
    state.permits.reconfigure(catalog.providers)
    # A draining provider serves no new request: it does not widen a model's cooling share.
    state.health.reconfigure(
        routing,
        catalog.providers,
        {
            model: [provider.name for provider in serving if not provider.draining]
            for model, serving in catalog.serving.items()
        },
    )
    state.poller.track(catalog.providers)
    state.retries.reconfigure(routing)
    state.key_limits.shares.track(catalog.keys.values())  # new limits: claimed at the next sync
    router = Router(
        catalog,
        routing,
        spill=settings.affinity.spill,
        affinity=state.affinity,
        health=state.health,
        permits=state.permits,
        load=state.poller,
        metrics=state.metrics,
        seed=state.tiebreak_seed,
        memory=state.memory,
    )
    dispatcher = Dispatcher(
        state.client,
        state.health,
        state.permits,
        routing,
        state.retries,
        dropped_headers=frozenset({routing.mode_header.lower()}),
        # A node that failed enough to cool down comes back as an unknown: neutral latency.
        on_cooldown=router.latency.forget,
        # A stream's first event is checked whole before the client sees it: up to the body limit.
        max_first_event_bytes=settings.server.max_body_bytes,
    )
    proxy = Proxy(
        catalog,
        router,
        dispatcher,
        state.metrics,
        responses=ResponseBindings(state.store, catalog, settings.affinity),
        max_body_bytes=settings.server.max_body_bytes,
        mode_header=routing.mode_header,
        connections_per_key=ConnectionShare.of(
            settings.server.max_connections_per_worker, settings.server.max_connection_share_per_key
        ),
        key_limits=state.key_limits,
        recent=state.recent,
        request_compression=settings.server.request_compression,
        write_timeout=routing.downstream_write_timeout_seconds,
        memory_budget=state.memory_budget,
        shedder=state.shedder,
        usage_book=state.usage_book,
        model_cards=state.model_cards,
    )
    return Runtime(
        settings=settings,
        catalog=catalog,
        proxy=proxy,
        digest=settings_digest(settings),
        loaded_at=time.time(),
        restart_needed=restart_needed,
    )
