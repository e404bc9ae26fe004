"""The claim's choice between the agreed candidate and the least-bound one."""

from __future__ import annotations

import pytest

from affinity_store.spread import COUNTER_SHARDS, choose_candidate, counter_shard
from affinity_store.store import Candidate, Spread

ALPHA = Candidate("alpha", "alpha")
BETA = Candidate("beta", "beta")
GAMMA = Candidate("gamma", "gamma")
AGREEMENT = Spread(share=0.1, minimum=2)


def test_without_allowance_the_least_bound_wins_then_order() -> None:
    """Fewest bindings wins; ties go to the earlier candidate; unknown counts are 0."""
    assert choose_candidate([ALPHA, BETA], {"alpha": 2, "beta": 1}, Spread()) == BETA
    assert choose_candidate([ALPHA, BETA], {"alpha": 1, "beta": 1}, Spread()) == ALPHA
    assert choose_candidate([ALPHA, BETA], {"alpha": 1}, Spread()) == BETA


def test_the_first_candidate_keeps_its_key_within_the_minimum_allowance() -> None:
    """Up to `minimum` more bindings than the least-bound one, the first candidate still wins."""
    assert choose_candidate([ALPHA, BETA, GAMMA], {"alpha": 2}, AGREEMENT) == ALPHA
    assert choose_candidate([ALPHA, BETA, GAMMA], {"alpha": 3}, AGREEMENT) == BETA


def test_the_allowance_grows_with_the_share_of_the_least_bound_count() -> None:
    """At 100 bindings a 10 % share allows 10 more, not 11."""
    counts = {"alpha": 110, "beta": 100, "gamma": 105}
    assert choose_candidate([ALPHA, BETA, GAMMA], counts, AGREEMENT) == ALPHA
    counts["alpha"] = 111
    assert choose_candidate([ALPHA, BETA, GAMMA], counts, AGREEMENT) == BETA


def test_aliases_share_their_routing_identity_count() -> None:
    """Two providers of one routing identity are counted together."""
    first_alias = Candidate("account-a", "account")
    second_alias = Candidate("account-b", "account")
    counts = {"account": 5, "gamma": 0}
    chosen = choose_candidate([second_alias, first_alias, GAMMA], counts, AGREEMENT)
    assert chosen == GAMMA


def test_an_empty_preference_is_refused() -> None:
    """There is nothing to choose from."""
    with pytest.raises(ValueError, match="preferred"):
        choose_candidate([], {}, AGREEMENT)


def test_counter_shards_cover_the_range_for_signed_lock_keys() -> None:
    """Negative and positive lock keys map into [0, COUNTER_SHARDS)."""
    shards = {counter_shard(lock_key) for lock_key in range(-64, 64)}
    assert shards == set(range(COUNTER_SHARDS))
