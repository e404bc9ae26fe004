"""The fleet's latency view: each node's own time-to-first-token figures, and bands that hold.

vLLM and SGLang count every request's time to first token (queueing included) in a histogram on
`/metrics`. Every gateway process polls the same counters, so a node's mean over the last
`window_seconds` is nearly the same figure in every process, whatever traffic each carries
itself: bands made from it agree across the fleet and see a recovered node within one window.

A figure needs `MIN_FIRST_TOKENS` first tokens in the window: a handful of requests says more
about their prompts than about the node.

Bands change with hysteresis: a provider leaves its band only once its position (its distance
from the model's reference, in band widths) is `hysteresis` band widths inside the new one, so
noise around a boundary does not flap it back and forth.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.routing.latency import MINIMUM_TOLERANCE_SECONDS, held_band

MIN_FIRST_TOKENS = 10
"""First tokens a node must have counted in the window for its mean to be a figure."""

CLEARLY_SLOW_BAND = 2
"""Without the store, only a node at least this many bands slow is ranked apart (see
`shared_band`)."""


def shared_band(band: int) -> int:
    """The band a process uses when it cannot ask the store: 1 for a node clearly slow by its
    own metrics, else 0. Every process must reach the same answer, and fleet figures differ a
    little between processes (each reads at its own moment), so only a difference too large for
    that to flip counts."""
    return 1 if band >= CLEARLY_SLOW_BAND else 0


@dataclass(slots=True)
class NodeTtft:
    """Cumulative (time, seconds, count) readings of one node's TTFT histogram over a window."""

    readings: deque[tuple[float, float, float]] = field(default_factory=deque)

    def add(self, now: float, total_seconds: float, count: float) -> None:
        """Keep one reading; a counter that went back (the node restarted) starts afresh."""
        readings = self.readings
        if readings and (count < readings[-1][2] or total_seconds < readings[-1][1]):
            readings.clear()
        readings.append((now, total_seconds, count))

    def fresh(self, now: float, max_age_seconds: float) -> bool:
        """Whether the newest reading is at most `max_age_seconds` old."""
        return bool(self.readings) and now - self.readings[-1][0] <= max_age_seconds

    def mean(self, now: float, window_seconds: float, max_age_seconds: float) -> float | None:
        """The node's mean TTFT over the last `window_seconds`; None with fewer than
        `MIN_FIRST_TOKENS` first tokens in it, or when the newest reading is older than
        `max_age_seconds` (the polls failed)."""
        readings = self.readings
        cutoff = now - window_seconds
        # The base is the newest reading at least a window old, so the span covers the window.
        while len(readings) > 2 and readings[1][0] <= cutoff:
            readings.popleft()
        if len(readings) < 2 or not self.fresh(now, max_age_seconds):
            return None
        _, base_seconds, base_count = readings[0]
        _, last_seconds, last_count = readings[-1]
        if last_count - base_count < MIN_FIRST_TOKENS:
            return None
        return (last_seconds - base_seconds) / (last_count - base_count)


def fleet_bands(
    figures: Mapping[str, float],
    previous: Mapping[str, int],
    *,
    band_fraction: float,
    hysteresis: float,
) -> dict[str, int]:
    """Band every provider with a node figure against the mean of those figures.

    Each provider counts once in the reference, however much traffic it carries. With fewer than
    two figures there is nothing to compare: every one is band 0.
    """
    if len(figures) < 2:
        return dict.fromkeys(figures, 0)
    reference = sum(figures.values()) / len(figures)
    width = 2 * max(reference * band_fraction, MINIMUM_TOLERANCE_SECONDS)
    return {
        name: held_band((seconds - reference) / width, previous.get(name), hysteresis)
        for name, seconds in figures.items()
    }


@dataclass(slots=True)
class FleetLatency:
    """The fleet bands of every model, made once per poll round, and the bands they hold."""

    polls: int = -1
    """The poll round the bands were made from."""
    bands: dict[str, dict[str, int]] = field(default_factory=dict)
    """model → provider → band, for the providers whose node gave a figure."""
    publishing: frozenset[str] = frozenset()
    """Providers whose nodes publish a TTFT histogram: their band is the node's, or 0 while the
    node has no figure (too little traffic), never this process's own samples."""

    def update(
        self,
        polls: int,
        figures: Mapping[str, Mapping[str, float]],
        *,
        publishing: frozenset[str] = frozenset(),
        band_fraction: float,
        hysteresis: float,
    ) -> None:
        """Band each model's providers on `figures` (model → provider → node TTFT)."""
        self.publishing = publishing
        previous = self.bands
        self.bands = {
            model: fleet_bands(
                by_provider,
                previous.get(model, {}),
                band_fraction=band_fraction,
                hysteresis=hysteresis,
            )
            for model, by_provider in figures.items()
            if by_provider
        }
        self.polls = polls
