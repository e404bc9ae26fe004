"""The latency bands routing reads: from the nodes' own figures where they publish them, else
from this process's samples.

A node that publishes a TTFT histogram speaks for itself (band 0 while too little traffic makes
no figure); the bands made from those figures are remade once per poll round, so every process
reading the same counters agrees on them. Other providers are banded on this process's samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from gateway.catalog import Catalog
from gateway.config_service import RoutingSettings
from gateway.dispatch.load import LoadPoller
from gateway.routing.latency import LatencyTracker
from gateway.routing.node_latency import FleetLatency, shared_band

LatencySource = Literal["node", "own", "none"]
LATENCY_SOURCES: tuple[LatencySource, ...] = ("node", "own", "none")
_NO_FLEET_BANDS: Mapping[str, int] = {}


class LatencyBands:
    """Each provider's latency band per model, and where the figure behind it comes from."""

    def __init__(
        self,
        catalog: Catalog,
        routing: RoutingSettings,
        *,
        latency: LatencyTracker,
        fleet: FleetLatency,
        poller: LoadPoller,
    ) -> None:
        """Band `catalog`'s providers by `routing`'s band settings, on `poller`'s node figures
        (remade into `fleet`) and `latency`'s samples."""
        self._catalog = catalog
        self._routing = routing
        self._latency = latency
        self._fleet = fleet
        self._poller = poller

    def source(self, provider: str, now: float) -> tuple[LatencySource, float | None]:
        """Where the provider's band comes from, and the age of its newest figure: `node`
        (the node's own metrics), `own` (this process's samples) or `none` (band 0)."""
        if self._poller.node_ttft(provider) is not None:
            return "node", self._poller.node_ttft_age(provider)
        if self._poller.publishes_ttft(provider):
            return "none", None  # the node's own view, with too little traffic for a figure
        newest = self._latency.newest_sample_at(provider)
        if newest is not None and now - newest < self._routing.latency_sample_max_age_seconds:
            return "own", now - newest
        return "none", None

    def fleet_bands(self, model: str) -> Mapping[str, int]:
        """The model's bands made from the nodes' own figures, remade once per poll round."""
        polls = self._poller.polls
        if polls != self._fleet.polls:
            routing = self._routing
            self._fleet.update(
                polls,
                {
                    model: {
                        provider.name: seconds
                        for provider in providers
                        if (seconds := self._poller.node_ttft(provider.name)) is not None
                    }
                    for model, providers in self._catalog.serving.items()
                },
                publishing=frozenset(
                    name for name in self._catalog.providers if self._poller.publishes_ttft(name)
                ),
                band_fraction=routing.latency_band_fraction,
                hysteresis=routing.latency_band_hysteresis,
            )
        return self._fleet.bands.get(model, _NO_FLEET_BANDS)

    def bands(
        self, model: str, providers: Sequence[str], now: float, *, shared_only: bool = False
    ) -> dict[str, int]:
        """Each provider's band: where its node publishes a TTFT histogram, from the node's own
        figure (0 while too little traffic makes none); else from this process's samples. With
        `shared_only`, only what every process sees alike: a node its own figures show clearly
        slow is band 1, every other provider band 0."""
        fleet = self.fleet_bands(model)
        if shared_only:
            return {provider: shared_band(fleet.get(provider, 0)) for provider in providers}
        publishing = self._fleet.publishing
        if publishing and all(provider in publishing for provider in providers):
            # Every node speaks for itself: a node without a figure yet (too little traffic
            # in its window) is band 0, never slow on this process's stale samples.
            return {provider: fleet.get(provider, 0) for provider in providers}
        bands = self._latency.bands(
            model,
            providers,
            now,
            band_fraction=self._routing.latency_band_fraction,
            min_samples=self._routing.latency_min_samples,
            enabled=True,
            hysteresis=self._routing.latency_band_hysteresis,
        )
        if publishing:
            for provider in providers:
                if provider in publishing:
                    bands[provider] = fleet.get(provider, 0)
        return bands
