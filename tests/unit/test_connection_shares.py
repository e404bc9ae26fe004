"""Each key's share of a worker's connections: counted per key, refused past the limit."""

from __future__ import annotations

import pytest

from gateway.config import ServerSettings
from gateway.dispatch.permits import KeyLimits, per_key_limit
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
    """Two requests fill a limit of two: the third gets 429 `key_connection_share`; another key
    is admitted; a release makes room again."""
    limits = KeyLimits()
    greedy, other = plain_key("greedy"), plain_key("other")
    limits.acquire(greedy, 2)
    limits.acquire(greedy, 2)
    with pytest.raises(GatewayError) as refused:
        limits.acquire(greedy, 2)
    assert refused.value.status == 429
    assert refused.value.code == "key_connection_share"
    assert refused.value.retry_after == 1
    limits.acquire(other, 2)
    assert (limits.in_flight(greedy), limits.in_flight(other)) == (2, 1)
    limits.release(greedy)
    limits.acquire(greedy, 2)
    assert limits.in_flight(greedy) == 2


def test_a_refused_request_takes_no_place() -> None:
    """A 429 leaves the count where it was, and every release brings it back to zero."""
    limits = KeyLimits()
    greedy = plain_key("greedy")
    limits.acquire(greedy, 1)
    with pytest.raises(GatewayError):
        limits.acquire(greedy, 1)
    limits.release(greedy)
    assert limits.in_flight(greedy) == 0
