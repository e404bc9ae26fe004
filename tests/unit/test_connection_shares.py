"""Each key's share of a worker's connections: counted per key, refused past the limit once the
worker is crowded."""

from __future__ import annotations

import pytest

from gateway.config_service import ServerSettings
from gateway.dispatch.permits import ConnectionShare, KeyLimits, per_key_limit
from gateway.shared.errors import GatewayError
from tests.support.keys import plain_key


@pytest.mark.parametrize(
    ("connections", "share", "limit"),
    [(1024, 0.5, 512), (3, 0.5, 1), (1, 0.1, 1), (401, 0.5, 200), (8, 1.0, 8)],
)
def test_the_per_key_limit_is_the_share_of_the_cap_rounded_down_and_at_least_one(
    connections: int, share: float, limit: int
) -> None:
    """`share` of the connection cap, rounded down; never below one request."""
    assert per_key_limit(connections, share) == limit


def test_the_default_share_is_half_of_the_default_cap() -> None:
    """By default one key may hold 512 of a worker's 1,024 connections."""
    server = ServerSettings()
    assert server.max_connection_share_per_key == 0.5
    assert (
        per_key_limit(server.max_connections_per_worker, server.max_connection_share_per_key) == 512
    )


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share: float) -> None:
    """A share of nothing, or of more than the whole cap, is a config error."""
    with pytest.raises(ValueError, match="max_connection_share_per_key"):
        ServerSettings(max_connection_share_per_key=share)


def test_a_key_at_its_limit_gets_429_while_another_key_is_counted_apart() -> None:
    """On a crowded worker, two requests fill a limit of two: the third gets 429
    `key_connection_share`; another key is admitted; a release makes room again."""
    limits = KeyLimits()
    greedy, other = plain_key("greedy"), plain_key("other")
    share = ConnectionShare(per_key=2, crowded=1)  # crowded from the first request on
    limits.acquire(greedy, share)
    limits.acquire(greedy, share)
    with pytest.raises(GatewayError) as refused:
        limits.acquire(greedy, share)
    assert refused.value.status == 429
    assert refused.value.code == "key_connection_share"
    assert refused.value.retry_after == 1
    limits.acquire(other, share)
    assert (limits.in_flight(greedy), limits.in_flight(other)) == (2, 1)
    limits.release(greedy)
    limits.acquire(greedy, share)
    assert limits.in_flight(greedy) == 2


def test_a_refused_request_takes_no_place() -> None:
    """A 429 leaves the count where it was, and every release brings it back to zero."""
    limits = KeyLimits()
    greedy = plain_key("greedy")
    share = ConnectionShare(per_key=1, crowded=1)
    limits.acquire(greedy, share)
    with pytest.raises(GatewayError):
        limits.acquire(greedy, share)
    limits.release(greedy)
    assert limits.in_flight(greedy) == 0


def test_the_share_applies_from_three_quarters_of_the_cap() -> None:
    """A cap of 1,024 with a share of 0.5: 512 per key, applied once 768 requests are in
    progress on the worker."""
    assert ConnectionShare.of(1024, 0.5) == ConnectionShare(per_key=512, crowded=768)
    assert ConnectionShare.of(8, 0.5) == ConnectionShare(per_key=4, crowded=6)


def test_one_key_may_use_an_uncrowded_worker_past_its_share() -> None:
    """A batch client alone on a worker (cap 8, share 4) is admitted up to the crowding point
    (6 requests), then refused; another key is still admitted on the crowded worker, up to its
    own share."""
    limits = KeyLimits()
    batch, other = plain_key("batch"), plain_key("other")
    share = ConnectionShare.of(8, 0.5)
    for _ in range(6):
        limits.acquire(batch, share)
    with pytest.raises(GatewayError) as refused:
        limits.acquire(batch, share)
    assert refused.value.code == "key_connection_share"
    for _ in range(4):
        limits.acquire(other, share)
    with pytest.raises(GatewayError):
        limits.acquire(other, share)
    assert (limits.in_flight(batch), limits.in_flight(other)) == (6, 4)


def test_a_key_within_its_share_is_admitted_on_a_crowded_worker() -> None:
    """Once another key has crowded the worker, a key under its share is still admitted, and the
    crowding key is refused as soon as the worker is crowded again after a release."""
    limits = KeyLimits()
    batch, light = plain_key("batch"), plain_key("light")
    share = ConnectionShare(per_key=2, crowded=3)
    for _ in range(3):
        limits.acquire(batch, share)
    limits.acquire(light, share)
    limits.release(batch)
    # Three in progress (two of them the batch key's, at its share): crowded, so refused.
    with pytest.raises(GatewayError):
        limits.acquire(batch, share)
    limits.release(light)
    limits.acquire(batch, share)
    assert limits.in_flight(batch) == 3
