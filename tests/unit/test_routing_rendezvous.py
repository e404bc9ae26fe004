"""Rendezvous hashing: stable, order-free, and moving only the keys of a removed provider."""

from __future__ import annotations

from collections import Counter

from gateway.routing.rendezvous import rendezvous_order, rendezvous_weight

PROVIDERS = ["gpu-a", "gpu-b", "gpu-c", "gpu-d"]
KEYS = [f"key-{index}" for index in range(2000)]


def winner(key: str, providers: list[str]) -> str:
    """The rendezvous winner of `key` for the model `m`."""
    return rendezvous_order(key, "m", providers)[0]


def test_the_choice_does_not_depend_on_candidate_order() -> None:
    """Listing the candidates in any order gives the same full ranking."""
    for key in KEYS[:200]:
        expected = rendezvous_order(key, "m", PROVIDERS)
        assert rendezvous_order(key, "m", list(reversed(PROVIDERS))) == expected
        assert rendezvous_order(key, "m", PROVIDERS[2:] + PROVIDERS[:2]) == expected


def test_weights_are_fixed_values_not_per_process_hashes() -> None:
    """The weight is a pure function of its inputs (no per-process hash seed)."""
    assert rendezvous_weight("key-1", "m", "gpu-a") == rendezvous_weight("key-1", "m", "gpu-a")
    assert rendezvous_weight("key-1", "m", "gpu-a") == 0x5053E4FC4961432E
    assert rendezvous_weight("ab", "c", "p") != rendezvous_weight("a", "bc", "p")


def test_removing_a_provider_moves_only_its_own_keys() -> None:
    """Keys won by a remaining provider keep it; the removed one's keys spread over the rest."""
    before = {key: winner(key, PROVIDERS) for key in KEYS}
    remaining = [name for name in PROVIDERS if name != "gpu-b"]
    after = {key: winner(key, remaining) for key in KEYS}
    for key in KEYS:
        if before[key] != "gpu-b":
            assert after[key] == before[key]
    moved = Counter(after[key] for key in KEYS if before[key] == "gpu-b")
    assert set(moved) == set(remaining)


def test_keys_spread_evenly() -> None:
    """Two thousand keys over four providers land within 20 % of an even share each."""
    shares = Counter(winner(key, PROVIDERS) for key in KEYS)
    assert all(400 <= count <= 600 for count in shares.values()), shares
    assert rendezvous_order("k", "m", ["only"]) == ["only"]
    assert rendezvous_order("k", "m", []) == []
