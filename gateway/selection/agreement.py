"""The agreed tier: the candidates every process agrees on for a key, in rendezvous order.

Ranked on what every process sees alike, the leading candidates that differ only by
tie-breakers are equally good; rendezvous hashing of the key over them puts the same one first
in every process, so a claim binds it (unless that would overload it) and a process that
cannot ask the store routes to it.
"""

from __future__ import annotations

from collections.abc import Sequence

from affinity_store.store import Candidate
from gateway.catalog import Provider
from gateway.routing.ordering import Ranked
from gateway.routing.rendezvous import rendezvous_order

# Rules below these in the sort key only break ties, so candidates separated by them are
# equally good: the claim lets cluster-wide spread choose among them.
TIE_REASONS = frozenset({"least-recent", "tiebreak"})


def agreed_tier(
    api_key_id: str, model: str, ranked: list[Ranked], candidates: Sequence[Provider]
) -> list[Candidate]:
    """The leading candidates that differ only by tie-breakers, in rendezvous order.

    Its first entry is the provider every process agrees on for the key: the claim binds
    it unless that would overload it, and a process that cannot ask the store routes to it.
    """
    by_name = {provider.name: provider for provider in candidates}
    tier: list[str] = []
    for position, entry in enumerate(ranked):
        if entry.reason == "cooling" or (position > 0 and entry.reason not in TIE_REASONS):
            break
        tier.append(entry.provider)
    if not tier:  # everyone is cooling: the least bad is still the best there is
        tier.append(ranked[0].provider)
    return [
        Candidate(name, by_name[name].routing_identity)
        for name in rendezvous_order(api_key_id, model, tier)
    ]
