"""New request ids: a random per-process prefix and a counter."""

from __future__ import annotations

from gateway.edge.requestid import WELL_FORMED, RequestIds


def test_ids_from_one_source_are_distinct_and_well_formed() -> None:
    """Successive ids never repeat and pass the same check an incoming id must pass."""
    ids = RequestIds()
    made = [ids.new() for _ in range(1000)]
    assert len(set(made)) == len(made)
    assert all(WELL_FORMED.match(made_id) for made_id in made)


def test_two_sources_share_no_ids() -> None:
    """Two processes (two apps) draw different prefixes, so their ids never collide."""
    first, second = RequestIds(), RequestIds()
    assert first.new().split("-")[0] != second.new().split("-")[0]
    assert not {first.new() for _ in range(100)} & {second.new() for _ in range(100)}
