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

    `counts` holds bindings per routing identity; earlier candidates win ties.
    """
    if not preferred:
        raise ValueError("a claim needs at least one preferred candidate")

    def bound(candidate: Candidate) -> int:
        return counts.get(candidate.routing_identity, 0)

    least = min(preferred, key=bound)
    first = preferred[0]
    if bound(first) - bound(least) <= spread.allowance(bound(least)):
        return first
    return least


def counter_shard(lock_key: int) -> int:
    """The counter shard of a binding, from its (signed 32-bit) advisory lock key."""
    return lock_key % COUNTER_SHARDS
