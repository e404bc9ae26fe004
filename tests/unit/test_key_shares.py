"""The arithmetic of cluster-wide key limits: fair splits, grants, and a worker's rate bucket."""

from __future__ import annotations

import pytest

from affinity_store.shares import ShareRow, fair_shares, grant
from gateway.dispatch.key_shares import CONCURRENCY, RATE, ShareBook
from gateway.dispatch.permits import KeyLimits
from gateway.shared.errors import GatewayError
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


def test_a_lapsed_registration_drops_every_concurrency_grant_once() -> None:
    """Past the time the store counts its grants, a worker holds no unit of any key's
    `max_concurrency`, and says it lapsed once; the next heartbeat makes it count again."""
    now = [0.0]
    book = ShareBook(workers=1, clock=lambda: now[0])
    key = plain_key(max_concurrency=4)
    book.track([key])
    book.granted(key.id, CONCURRENCY, 3, 3, 3)
    book.valid_until = 9.5
    assert book.registered
    assert book.concurrency(key) == 3
    now[0] = 9.5
    assert book.concurrency(key) == 0
    assert (book.lapses, book.registered) == (1, False)
    assert not book.lapsed()  # dropped once, not again
    book.valid_until = 19.0
    assert book.registered


def test_a_heartbeat_lowers_or_drops_grants_but_never_raises_one() -> None:
    """The heartbeat's read may predate a give-back: a grant it shows higher is not taken; one it
    no longer shows was lost with a lapse and is dropped."""
    book = ShareBook(workers=1, clock=lambda: 0.0)
    first, second = plain_key("a", max_concurrency=4), plain_key("b", max_concurrency=4)
    book.track([first, second])
    book.granted("a", CONCURRENCY, 1, 2, 1)
    book.granted("b", CONCURRENCY, 2, 2, 2)
    assert book.standing({("a", CONCURRENCY): 3}) == 1
    assert (book.concurrency(first), book.concurrency(second)) == (1, 0)


def test_units_beyond_the_held_share_go_back_once_idle() -> None:
    """A worker holding 1 for its steady load and 3 in all: when its requests end, a give-back
    lowers the grant at once to what is in use or held; one give-back at a time."""
    book = ShareBook(workers=1, clock=lambda: 0.0)
    key = plain_key(max_concurrency=4)
    book.track([key])
    book.granted(key.id, CONCURRENCY, 1, 4, 1)
    book.unit(key.id, 3, full_since=None)
    assert book.finished(key, 2)
    assert not book.finished(key, 1)  # one is under way already
    assert book.give_back(key.id, 1) == 1
    assert book.concurrency(key) == 1
    assert book.give_back(key.id, 1) is None  # nothing more: the give-back is over
    assert not book.finished(key, 0)  # the held unit stays
