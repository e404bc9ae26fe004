"""The in-memory twin's own knobs: injected clock and injected failure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.store import Candidate, StoreUnavailable

ALPHA = Candidate("alpha", "alpha")


class FakeClock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        """Start at a fixed instant."""
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        """Return the current fake time."""
        return self.now


async def test_bindings_expire_by_the_injected_clock() -> None:
    """A binding is live until the clock passes its TTL, then looks up as None."""
    clock = FakeClock()
    store = MemoryAffinityStore(clock=clock)
    await store.claim("k", "m", acceptable={"alpha"}, preferred=[ALPHA], ttl_seconds=60, timeout=1)
    clock.now += timedelta(seconds=59)
    found = await store.lookup("k", "m", timeout=1)
    assert found is not None
    assert found.ttl_remaining == pytest.approx(1.0)
    clock.now += timedelta(seconds=1)
    assert await store.lookup("k", "m", timeout=1) is None


async def test_an_injected_failure_makes_every_call_raise_until_cleared() -> None:
    """`fail_with` simulates an outage for callers that must degrade."""
    store = MemoryAffinityStore()
    store.fail_with(StoreUnavailable("down"))
    with pytest.raises(StoreUnavailable):
        await store.lookup("k", "m", timeout=1)
    with pytest.raises(StoreUnavailable):
        await store.count_bindings(["alpha"], timeout=1)
    store.fail_with(None)
    assert await store.lookup("k", "m", timeout=1) is None
