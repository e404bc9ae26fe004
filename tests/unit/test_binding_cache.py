"""The local copies of bindings: bounded overall and per key, least recently used out first."""

from __future__ import annotations

import pytest

from gateway.selection.binding_cache import BindingCache


def test_past_its_share_a_key_loses_only_its_own_oldest_copy() -> None:
    """An application key's flood of conversations never evicts another key's copies."""
    cache: BindingCache[str] = BindingCache(capacity=100, per_key_capacity=10)
    for index in range(5):
        cache.put(("quiet", f"model-{index}"), "node-a")
    for conversation in range(1000):
        cache.put(("app", f"model#{conversation}"), "node-b")
    assert cache.held_by("app") == 10
    assert cache.held_by("quiet") == 5
    assert cache.get(("app", "model#999")) == "node-b"
    assert cache.get(("app", "model#989")) is None
    assert len(cache) == 15


def test_past_the_whole_capacity_the_least_recently_used_copy_goes() -> None:
    """Many keys within their shares: the oldest use is evicted first, and a put counts as use."""
    cache: BindingCache[int] = BindingCache(capacity=3, per_key_capacity=3)
    cache.put(("a", "m"), 1)
    cache.put(("b", "m"), 2)
    cache.put(("c", "m"), 3)
    cache.put(("a", "m"), 1)  # used again: b is now the oldest
    cache.put(("d", "m"), 4)
    assert cache.get(("b", "m")) is None
    assert [cache.get((key, "m")) for key in "acd"] == [1, 3, 4]
    assert cache.held_by("b") == 0


def test_pop_forgets_an_entry_everywhere_it_is_counted() -> None:
    """A popped copy no longer counts towards its key's share; popping twice is harmless."""
    cache: BindingCache[str] = BindingCache(capacity=10, per_key_capacity=2)
    cache.put(("k", "m1"), "x")
    cache.put(("k", "m2"), "y")
    assert cache.pop(("k", "m1")) == "x"
    assert cache.pop(("k", "m1")) is None
    cache.put(("k", "m3"), "z")
    assert cache.get(("k", "m2")) == "y"
    assert cache.held_by("k") == 2


@pytest.mark.parametrize(("capacity", "per_key"), [(0, 1), (1, 0)])
def test_capacities_must_be_positive(capacity: int, per_key: int) -> None:
    """A cache that could hold nothing is a configuration error."""
    with pytest.raises(ValueError, match="at least 1"):
        BindingCache(capacity, per_key)
