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


def test_weights_compare_bindings_per_unit_of_capacity() -> None:
    """A node with twice the cache is as loaded with twice the bindings; unknown ones weigh the
    mean of the known."""
    weights = Spread(weights={"alpha": 2000.0, "beta": 1000.0})
    assert choose_candidate([BETA, ALPHA], {"alpha": 2, "beta": 1}, weights) == BETA
    assert choose_candidate([BETA, ALPHA], {"alpha": 1, "beta": 1}, weights) == ALPHA
    assert choose_candidate([ALPHA, BETA], {"alpha": 3, "beta": 1}, weights) == BETA
    # gamma reports nothing: it weighs 2000, the mean of 3000 and 1000.
    mean_weighted = Spread(weights={"alpha": 3000.0, "beta": 1000.0})
    counts = {"alpha": 2, "gamma": 2, "beta": 1}
    assert choose_candidate([GAMMA, ALPHA, BETA], counts, mean_weighted) == ALPHA


def test_a_full_candidate_is_passed_over_unless_all_are_full() -> None:
    """Weight 0 means a nearly full cache: no new binding while another candidate has room."""
    full_alpha = Spread(weights={"alpha": 0.0})
    assert choose_candidate([ALPHA, BETA], {"beta": 50}, full_alpha) == BETA
    every_full = Spread(weights={"alpha": 0.0, "beta": 0.0})
    assert choose_candidate([ALPHA, BETA], {"alpha": 5}, every_full) == BETA
    assert choose_candidate([ALPHA, BETA], {}, every_full) == ALPHA


def test_equal_weights_choose_as_no_weights_do() -> None:
    """Equal capacities change nothing: the allowance keeps the agreed candidate as before."""
    equal = Spread(share=0.1, minimum=2, weights={"alpha": 512.0, "beta": 512.0, "gamma": 512.0})
    for counts in ({"alpha": 2}, {"alpha": 3}, {"alpha": 110, "beta": 100, "gamma": 105}):
        plain = choose_candidate([ALPHA, BETA, GAMMA], counts, AGREEMENT)
        assert choose_candidate([ALPHA, BETA, GAMMA], counts, equal) == plain
