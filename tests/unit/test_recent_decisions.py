"""Recent decisions kept as tuples read back as the status page's rows."""

from __future__ import annotations

from gateway.shared.decisions import DecisionFields, RecentDecision, RecentDecisions


def _fields(request_id: str) -> DecisionFields:
    return (
        1_750_000_000.0,
        request_id,
        "team-a",
        "llama",
        "gpu-a",
        "hit",
        ("gpu-a:ok",),
        200,
        12.5,
    )


def test_kept_decisions_read_as_rows_with_every_field() -> None:
    """Each tuple comes back as the RecentDecision of the same fields."""
    recent = RecentDecisions(5)
    recent.add(_fields("r1"))
    assert list(recent) == [
        RecentDecision(
            at=1_750_000_000.0,
            request_id="r1",
            key_id="team-a",
            model="llama",
            provider="gpu-a",
            affinity="hit",
            attempts=("gpu-a:ok",),
            status=200,
            duration_ms=12.5,
        )
    ]


def test_only_the_last_ones_are_kept_oldest_first() -> None:
    """Past the limit the oldest go; the order is the order of arrival."""
    recent = RecentDecisions(2)
    for request_id in ("r1", "r2", "r3"):
        recent.add(_fields(request_id))
    assert len(recent) == 2
    assert [row.request_id for row in recent] == ["r2", "r3"]
