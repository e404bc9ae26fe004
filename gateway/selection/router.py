"""The selection seam: (request context, candidates, process state) → an ordered failover list.

It gathers the stickiness signal (the shared binding, or the session binding), the key's
model-group preference and the latency bands (`latency_bands`), then lets the pure policy in
`gateway.routing` order the candidates; a shared binding's claim offers the agreed tier
(`agreement`). The only I/O is the shared binding's look-up or claim.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import structlog

from affinity_store.store import Candidate
from gateway.catalog import Catalog, Key, Provider
from gateway.config_service import RoutingSettings, SpillSettings
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.load import LoadPoller, should_spill
from gateway.dispatch.permits import ProviderPermits
from gateway.routing.conversations import binding_model
from gateway.routing.latency import LatencyTracker
from gateway.routing.node_latency import FleetLatency
from gateway.routing.ordering import (
    ONLY_REASON,
    REASONS,
    OrderingRequest,
    ProviderState,
    StartTracker,
    order,
    tiebreak_ranks,
)
from gateway.routing.preferences import (
    MissingGroupReports,
    PreferenceKind,
    active_providers,
    preferred_set,
)
from gateway.routing.sessions import SessionTable
from gateway.selection.affinity import SharedAffinity
from gateway.selection.agreement import agreed_tier
from gateway.selection.latency_bands import LATENCY_SOURCES, LatencyBands, LatencySource
from gateway.selection.local_copies import CachedBinding
from gateway.shared.metrics import Metrics

logger = structlog.get_logger("gateway.selection.router")

AffinityKind = Literal["hit", "miss", "rebound", "spill", "preferred", "degraded", "none"]


@dataclass(frozen=True)
class RequestContext:
    """What the policy may know about one request (never its prompt)."""

    request_id: str
    key: Key
    model: str
    stream: bool
    session_id: str | None = None
    conversation: str | None = None
    """The conversation's keyed digest when its shared binding is per conversation."""

    @property
    def binding_model(self) -> str:
        """What the shared binding is keyed on beside the key: the model (and conversation)."""
        return binding_model(self.model, self.conversation)


@dataclass(frozen=True)
class RoutingDecision:
    """The failover list, why each provider is where it is, and what stickiness said."""

    failover: list[Provider]
    reasons: list[str]
    affinity: AffinityKind
    bound: CachedBinding | None = None
    spilled: bool = False


@dataclass(frozen=True)
class RouterMemory:
    """What a process learns while routing: latency samples and the nodes' own figures,
    session bindings, recent starts."""

    latency: LatencyTracker
    fleet: FleetLatency
    sessions: SessionTable
    starts: StartTracker

    @classmethod
    def fresh(cls, routing: RoutingSettings) -> RouterMemory:
        """Empty memory sized by the routing settings."""
        return cls(
            latency=LatencyTracker(
                routing.latency_window_seconds,
                max_age_seconds=routing.latency_sample_max_age_seconds,
            ),
            fleet=FleetLatency(),
            sessions=SessionTable(routing.session_ttl_seconds, routing.session_capacity),
            starts=StartTracker(),
        )


class Router:
    """Per-process routing state and the policy that turns it into failover lists."""

    def __init__(
        self,
        catalog: Catalog,
        routing: RoutingSettings,
        *,
        spill: SpillSettings,
        affinity: SharedAffinity,
        health: ProviderHealth,
        permits: ProviderPermits,
        load: LoadPoller,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
        memory: RouterMemory | None = None,
    ) -> None:
        self.catalog = catalog
        self.affinity = affinity
        # Given when a reload builds a new router: what this process learnt carries over.
        memory = memory or RouterMemory.fresh(routing)
        self.latency = memory.latency
        self.fleet = memory.fleet
        self.sessions = memory.sessions
        self.starts = memory.starts
        self.health = health
        self.permits = permits
        self._poller = load
        self._spill = spill
        self._routing = routing
        self._metrics = metrics
        self._clock = clock
        self._latency_bands = LatencyBands(
            catalog, routing, latency=self.latency, fleet=self.fleet, poller=load
        )
        self._tiebreak = tiebreak_ranks(catalog.providers, seed)
        self._missing_groups = MissingGroupReports()

    async def decide(
        self, context: RequestContext, candidates: Sequence[Provider]
    ) -> RoutingDecision:
        """Order one request's candidates, consulting the shared binding when the model has one."""
        if len(candidates) == 1:
            decided = self._lone_bound(
                context.key, context.model, candidates[0], context.conversation
            )
            if decided is not None:
                return decided
        return await self._ordered(context, candidates)

    async def _ordered(
        self, context: RequestContext, candidates: Sequence[Provider]
    ) -> RoutingDecision:
        """The general decision: every signal gathered, the candidates ordered on them."""
        now = self._clock()
        key, model = context.key, context.model
        names = [provider.name for provider in candidates]
        states = self._states(candidates, key, model, now)
        available = [state.name for state in states if state.available and not state.cooling]
        preference = preferred_set(key.model_group_preferences, self.catalog.groups, model, names)
        if preference.kind is PreferenceKind.MISSING_GROUP and self._missing_groups.first_report(
            key.id, model, preference.group or ""
        ):
            logger.warning(
                "preference_group_missing", key_id=key.id, model=model, group=preference.group
            )
        preferred = active_providers(preference, available)

        stickiness = self.catalog.stickiness(model)
        request = OrderingRequest(states, preferred=preferred)
        kind: AffinityKind = "none"
        bound: CachedBinding | None = None
        if stickiness == "shared":
            bound_model = context.binding_model
            lookup = await self.affinity.lookup(key.id, bound_model)
            binding = lookup.binding
            if binding is not None and binding.provider not in names:
                binding = None  # bound to a provider this request cannot use: a miss
            if lookup.degraded:
                kind = "degraded"
                # The last binding seen here, kept while the store is down; else the provider
                # every other process (and the store's claim) would pick.
                if binding is not None:
                    fallback = binding.provider
                else:
                    # Ranked on what every process sees alike (the nodes' own latency, not
                    # this process's samples), so they all agree on the provider.
                    shared = OrderingRequest(
                        self._states(candidates, key, model, now, shared_only=True),
                        preferred=preferred,
                    )
                    tier = agreed_tier(key.id, bound_model, order(shared), candidates)
                    fallback = tier[0].provider
                request = OrderingRequest(states, preferred=preferred, sticky=fallback)
            elif binding is not None and (preferred is None or binding.provider in preferred):
                kind, bound = "hit", binding
            else:
                overridden = binding is not None
                acceptable = preferred if preferred is not None else names
                tier = agreed_tier(key.id, bound_model, order(request), candidates)
                lookup = await self.affinity.claim(
                    key.id,
                    bound_model,
                    preferred=tier,
                    acceptable=acceptable,
                    weights=self._cache_weights(tier),
                    # One key's new conversations choose one at a time, each seeing the last.
                    group=None if context.conversation is None else f"{key.id}\n{model}",
                )
                bound = lookup.binding
                if lookup.degraded:
                    kind = "degraded"
                    request = OrderingRequest(states, preferred=preferred, sticky=tier[0].provider)
                elif overridden:
                    kind = "preferred"  # the key's preference moved the binding into its group
                else:
                    kind = "miss"
            if bound is not None:
                request = OrderingRequest(states, preferred=preferred, sticky=bound.provider)
        elif stickiness == "session" and context.session_id is not None:
            sticky = self.sessions.get(key.id, context.session_id, now)
            if sticky is not None and sticky in names:
                kind = "preferred" if preferred is not None and sticky not in preferred else "hit"
                request = OrderingRequest(states, preferred=preferred, sticky=sticky)
            else:
                kind = "miss"
                request = OrderingRequest(
                    states,
                    preferred=preferred,
                    new_session=True,
                    session_counts=self.sessions.live_counts(now),
                )
        spilled = request.sticky is not None and should_spill(
            request.sticky,
            [name for name in available if name != request.sticky],
            self._poller.load,
            self._spill,
        )
        if spilled:
            # For this request only: the binding stays where it is.
            kind = "spill"
            request = dataclasses.replace(request, spilled=True)
        ranked = order(request)
        by_name = {provider.name: provider for provider in candidates}
        return RoutingDecision(
            failover=[by_name[entry.provider] for entry in ranked],
            reasons=[entry.reason for entry in ranked],
            affinity=kind,
            bound=bound,
            spilled=spilled,
        )

    def _lone_bound(
        self, key: Key, model: str, provider: Provider, conversation: str | None = None
    ) -> RoutingDecision | None:
        """The decision for a lone candidate the key's shared binding holds in this process's
        cache, when the key has no preference for the model; None for any other case.

        It is the one `decide` reaches there: one candidate leaves nothing to order or spill
        ("cooling" or "only"), and a binding to it is a hit.
        """
        if key.model_group_preferences.get(model) is not None:
            return None
        if self.catalog.stickiness(model) != "shared":
            return None
        binding = self.affinity.cached(key.id, binding_model(model, conversation))
        if binding is None or binding.provider != provider.name:
            return None
        reason = REASONS[0] if self.health.cooling(provider.name) else ONLY_REASON
        return RoutingDecision(failover=[provider], reasons=[reason], affinity="hit", bound=binding)

    def affinity_header(self, decision: RoutingDecision, provider: Provider) -> AffinityKind:
        """`x-gateway-affinity` once the serving provider is known: a failover is a rebind."""
        if decision.spilled:
            return "spill"
        if decision.bound is not None and provider.name != decision.bound.provider:
            return "rebound"
        return decision.affinity

    def publish_gauges(self) -> None:
        """Mirror per-process state into gauges: in-flight, cooldown, load and latency bands."""
        now = self._clock()
        metrics = self._metrics
        self.affinity.publish_gauges()
        for name in self.catalog.providers:
            metrics.provider_in_flight.labels(name).set(self.permits.in_flight(name))
            metrics.provider_cooldown.labels(name).set(self.health.cooling_remaining(name))
            metrics.provider_load.labels(name).set(self._poller.load(name))
            capacity = self._poller.cache_capacity(name)
            metrics.provider_cache_tokens.labels(name).set(-1 if capacity is None else capacity)
        for model, providers in self.catalog.serving.items():
            for provider, band in self.bands(model, [p.name for p in providers], now).items():
                metrics.latency_band.labels(provider, model).set(band)
        for name in self.catalog.providers:
            source, age = self.latency_source(name, now)
            for kind in LATENCY_SOURCES:
                metrics.latency_source.labels(name, kind).set(1 if kind == source else 0)
            metrics.latency_age.labels(name).set(age or 0.0)

    def latency_source(self, provider: str, now: float) -> tuple[LatencySource, float | None]:
        """Where the provider's band comes from, and the age of its newest figure: `node`
        (the node's own metrics), `own` (this process's samples) or `none` (band 0)."""
        return self._latency_bands.source(provider, now)

    def bands(
        self, model: str, providers: Sequence[str], now: float, *, shared_only: bool = False
    ) -> dict[str, int]:
        """The latency bands this process would use for the model (latency routing on); with
        `shared_only`, only what every process sees alike (see `LatencyBands.bands`)."""
        return self._latency_bands.bands(model, providers, now, shared_only=shared_only)

    def load(self, provider: str) -> float:
        """The provider's current load as routing sees it."""
        return self._poller.load(provider)

    def _cache_weights(self, tier: Sequence[Candidate]) -> dict[str, float]:
        """Each candidate node's KV-cache capacity where it reports one (0: nearly full)."""
        weights: dict[str, float] = {}
        for candidate in tier:
            capacity = self._poller.cache_capacity(candidate.provider)
            if capacity is not None:
                weights[candidate.routing_identity] = capacity
        return weights

    def load_is_polled(self, provider: str) -> bool:
        """Whether that load was polled from the provider (else it is local in-flight)."""
        return self._poller.is_polled(provider)

    def started(self, provider: Provider) -> None:
        """Note that an attempt started on the provider (least-recently-started ordering)."""
        self.starts.record(provider.routing_identity, self._clock())

    def succeeded(
        self,
        context: RequestContext,
        decision: RoutingDecision,
        provider: Provider,
        ttft_seconds: float | None,
    ) -> None:
        """Record a success: latency sample, session binding, and the shared renewal or rebind."""
        now = self._clock()
        if ttft_seconds is not None:
            self.latency.record(provider.name, context.model, ttft_seconds, now)
        if decision.spilled:
            return  # a spill is a detour: stickiness stays as it was
        stickiness = self.catalog.stickiness(context.model)
        if stickiness == "session" and context.session_id is not None:
            self.sessions.bind(
                context.key.id, context.session_id, provider.name, provider.routing_identity, now
            )
        elif stickiness == "shared":
            self.affinity.served(
                context.key.id,
                context.binding_model,
                bound=decision.bound,
                served=Candidate(provider.name, provider.routing_identity),
            )

    def _states(
        self,
        candidates: Sequence[Provider],
        key: Key,
        model: str,
        now: float,
        *,
        shared_only: bool = False,
    ) -> list[ProviderState]:
        # A lone candidate has no rival to be banded against: its band cannot change the order.
        bands = (
            self._latency_bands.bands(
                model, [provider.name for provider in candidates], now, shared_only=shared_only
            )
            if len(candidates) > 1 and key.latency_routing
            else {}
        )
        return [
            ProviderState(
                name=provider.name,
                routing_identity=provider.routing_identity,
                cooling=self.health.cooling(provider.name),
                available=self.permits.available(provider.name),
                band=bands.get(provider.name, 0),
                last_started=self.starts.last_started(provider.routing_identity),
                tiebreak=self._tiebreak.get(provider.name, 0),
            )
            for provider in candidates
        ]
