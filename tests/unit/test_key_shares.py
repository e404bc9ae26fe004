"""The arithmetic of cluster-wide key limits: fair splits, grants, and a worker's rate bucket."""

from __future__ import annotations

import pytest

from affinity_store.shares import ShareRow, fair_shares, grant
from gateway.dispatch.key_shares import RATE, ShareBook
from gateway.dispatch.permits import KeyLimits
from gateway.edge.errors import GatewayError
from tests.support.keys import plain_key


def test_a_fair_split_never_exceeds_the_limit_nor_a_want() -> None:
    """Max-min fair: small wants are met, the rest is split evenly, the sum is the limit."""
    shares = fair_shares(10, {"a": 1, "b": 8, "c": 8}, salt="k")
    assert shares in ({"a": 1, "b": 5, "c": 4}, {"a": 1, "b": 4, "c": 5})
    assert fair_shares(10, {"a": 1, "b": 2}, salt="k") == {"a": 1, "b": 2}


def test_indivisible_units_go_to_different_workers_for_different_keys() -> None:
    """A limit of 1 over 4 workers goes to one worker, not always the same one for every key."""
    wants = dict.fromkeys(("w1", "w2", "w3", "w4"), 1)
    winners = {
        next(
            worker for worker, share in fair_shares(1, wants, salt=f"key-{index}").items() if share
        )
        for index in range(40)
    }
    assert len(winners) > 1
    assert all(sum(fair_shares(1, wants, salt=f"key-{i}").values()) == 1 for i in range(40))


def test_a_grant_keeps_what_is_in_use_but_never_takes_what_others_hold() -> None:
    """`keep` holds a share above the fair one; the free remainder caps every grant."""
    others = [ShareRow("b", granted=3, wanted=3)]
    assert grant(4, "a", wanted=4, keep=0, others=others, salt="k") == (1, 2)
    assert grant(4, "a", wanted=4, keep=3, others=others, salt="k") == (1, 2)
    assert grant(4, "a", wanted=4, keep=2, others=[ShareRow("b", 1, 3)], salt="k") == (2, 2)


def test_a_rate_share_spends_tokens_and_says_when_the_next_one_comes() -> None:
    """A share of 60 per minute: a bucket of ten seconds' tokens, then one a second."""
    now = [100.0]
    limits = KeyLimits(shares=ShareBook(workers=1, clock=lambda: now[0]), clock=lambda: now[0])
    key = plain_key(requests_per_minute=60)
    for _ in range(10):
        limits.acquire(key)
    with pytest.raises(GatewayError) as refused:
        limits.acquire(key)
    assert refused.value.code == "key_rate_limit"
    assert refused.value.retry_after == pytest.approx(1.0)
    now[0] += 1.0
    limits.acquire(key)


def test_a_rate_share_of_nothing_refuses_and_asks_the_store_soon() -> None:
    """A worker granted no part of the key's rate refuses and wakes its sync."""
    book = ShareBook(workers=1, clock=lambda: 0.0)
    key = plain_key(requests_per_minute=2)
    book.track([key])
    book.granted("team-a", RATE, 0, 0)
    limits = KeyLimits(shares=book, clock=lambda: 0.0)
    with pytest.raises(GatewayError):
        limits.acquire(key)
    assert book.wake.is_set()
