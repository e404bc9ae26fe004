"""Metric children resolved once per label values, within a bound."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from gateway.shared.metric_children import Children


def _family() -> Counter:
    return Counter("things", "Things.", ["kind"], registry=CollectorRegistry())


def test_a_child_is_the_familys_own_and_counts_there() -> None:
    """The cached child is the one `labels()` gives, so what it counts shows in the family."""
    family = _family()
    children = Children(family)
    children.of("a").inc()
    children.of("a").inc()
    assert children.of("a") is family.labels("a")
    assert family.labels("a")._value.get() == 2


def test_past_its_bound_the_cache_starts_over_and_still_counts() -> None:
    """Beyond the bound old entries are forgotten, never the counts."""
    family = _family()
    children = Children(family, limit=2)
    for kind in ("a", "b", "c", "a"):
        children.of(kind).inc()
    assert len(children._children) <= 2
    assert family.labels("a")._value.get() == 2
    assert family.labels("c")._value.get() == 1
