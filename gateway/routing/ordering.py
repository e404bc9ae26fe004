"""The failover order of a request's candidates: a stable sort where the first difference wins.

1. cooling down → last;
2. preferred, when the key's preference is active;
3. the sticky target, unless spilled (ignored outside an active preferred set);
4. new sessions only: fewest live session bindings per routing identity;
5. latency band, lower first;
6. least recently started routing identity, never started first;
7. a per-process random tiebreak fixed at start-up, so replicas do not herd.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

REASONS = (
    "cooling",
    "preferred",
    "sticky",
    "fewest-sessions",
    "band",
    "least-recent",
    "tiebreak",
)
"""Names of the rules, in the order of the sort key."""

ONLY_REASON = "only"
"""The first provider's reason when no other candidate can take the request."""

_TIEBREAK_POSITION = REASONS.index("tiebreak")
_COMPARED_POSITIONS = range(1, _TIEBREAK_POSITION)
_NEVER_STARTED = -math.inf


@dataclass(frozen=True, slots=True)
class ProviderState:
    """What ordering needs to know about one candidate at the moment of the request."""

    name: str
    routing_identity: str
    cooling: bool
    available: bool
    """Not cooling and has a free permit now; decides whether a preference is active."""
    band: int
    last_started: float | None
    """Monotonic seconds of the latest start on this routing identity, None if never."""
    tiebreak: int


@dataclass(frozen=True, slots=True)
class OrderingRequest:
    """The candidates of one request and the routing signals that rank them."""

    candidates: Sequence[ProviderState]
    preferred: frozenset[str] | None = None
    """The preferred providers when the key's preference is active, else None."""
    sticky: str | None = None
    spilled: bool = False
    new_session: bool = False
    session_counts: Mapping[str, int] = field(default_factory=dict)
    """Live session bindings per routing identity; used for new sessions only."""


# A named tuple rather than a frozen dataclass: one is built per candidate per request, and a
# frozen dataclass costs about twice as much to construct.
class Ranked(NamedTuple):
    """One provider of the failover list, with the rule that placed it there."""

    provider: str
    reason: str
    """For the first: the rule that put it ahead of the second; for the others: the rule
    that put it behind its predecessor; "cooling" for every cooling provider."""


def order(request: OrderingRequest) -> list[Ranked]:
    """Return the candidates in failover order, each with the reason for its place."""
    candidates = request.candidates
    preferred = request.preferred
    if preferred is not None and not any(
        state.available and not state.cooling and state.name in preferred for state in candidates
    ):
        preferred = None  # Soft fallback: a preference nobody in it can serve is not active.
    sticky = None if request.spilled else request.sticky
    if sticky is not None and preferred is not None and sticky not in preferred:
        sticky = None  # An active preference outranks stickiness.
    counts = request.session_counts if request.new_session else None
    keys = [
        (
            state.cooling,
            preferred is not None and state.name not in preferred,
            state.name != sticky,
            0 if counts is None else counts.get(state.routing_identity, 0),
            state.band,
            _NEVER_STARTED if state.last_started is None else state.last_started,
            state.tiebreak,
            position,
        )
        for position, state in enumerate(candidates)
    ]
    keys.sort()
    ranked: list[Ranked] = []
    # The leader is explained by what beat the runner-up; every later one by what its
    # predecessor beat it on. Kept inline: this loop runs for every candidate of every request.
    previous = keys[1] if len(keys) > 1 and not keys[1][0] else None
    for key in keys:
        if key[0]:
            reason = REASONS[0]
        elif previous is None:
            reason = ONLY_REASON
        else:
            reason = REASONS[_TIEBREAK_POSITION]
            for position in _COMPARED_POSITIONS:
                if previous[position] != key[position]:
                    reason = REASONS[position]
                    break
        ranked.append(Ranked(candidates[key[-1]].name, reason))
        previous = key
    return ranked


def tiebreak_ranks(provider_names: Iterable[str], seed: int | None) -> dict[str, int]:
    """Return a random permutation of the providers as ranks; a None seed draws fresh entropy."""
    names = sorted(set(provider_names))
    random.Random(seed).shuffle(names)
    return {name: rank for rank, name in enumerate(names)}


class StartTracker:
    """The latest request start per routing identity, for least-recently-started ordering."""

    def __init__(self) -> None:
        """Start with no identity ever started."""
        self._last_started: dict[str, float] = {}

    def record(self, routing_identity: str, now: float) -> None:
        """Note that a request started on `routing_identity` at monotonic time `now`."""
        self._last_started[routing_identity] = now

    def last_started(self, routing_identity: str) -> float | None:
        """Return when `routing_identity` last started a request, or None if it never did."""
        return self._last_started.get(routing_identity)
