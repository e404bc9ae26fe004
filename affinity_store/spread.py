"""Which candidate a claim binds: the agreed one, unless that would pile bindings onto it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from affinity_store.store import Candidate, Spread

COUNTER_SHARDS = 16
"""Counter rows per routing identity (see sql/0002_binding_counts.sql)."""


def choose_candidate(
    preferred: Sequence[Candidate], counts: Mapping[str, int], spread: Spread
) -> Candidate:
    """The first candidate if it is within the spread allowance, else the least-bound one.

    `counts` holds bindings per routing identity; earlier candidates win ties. With weights,
    counts are scaled to bindings per mean capacity, and candidates of weight 0 (full) are left
    out unless every candidate is.
    """
    if not preferred:
        raise ValueError("a claim needs at least one preferred candidate")
    weights = spread.weights
    open_ = [c for c in preferred if weights.get(c.routing_identity) != 0.0] or list(preferred)
    known = [weights[c.routing_identity] for c in open_ if weights.get(c.routing_identity)]
    mean = sum(known) / len(known) if known else 0.0

    def bound(candidate: Candidate) -> float:
        count = counts.get(candidate.routing_identity, 0)
        weight = weights.get(candidate.routing_identity)
        if not weight or weight == mean:
            return float(count)
        return count * mean / weight

    least = min(open_, key=bound)
    first = open_[0]
    if bound(first) - bound(least) <= spread.allowance(bound(least)):
        return first
    return least


def counter_shard(lock_key: int) -> int:
    """The counter shard of a binding, from its (signed 32-bit) advisory lock key."""
    return lock_key % COUNTER_SHARDS
