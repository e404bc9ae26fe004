"""Client keys built directly, for tests of the per-key limits."""

from __future__ import annotations

from gateway.catalog import Key


def plain_key(
    key_id: str = "team-a",
    *,
    max_concurrency: int | None = None,
    requests_per_minute: int | None = None,
) -> Key:
    """A key that may use every model, with only the limits given."""
    return Key(
        id=key_id,
        org=None,
        digest="0" * 64,
        models=None,
        route_strategy="auto",
        route_target=None,
        model_group_preferences={},
        latency_routing=True,
        max_concurrency=max_concurrency,
        min_start_interval_seconds=0.0,
        requests_per_minute=requests_per_minute,
    )
