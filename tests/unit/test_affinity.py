"""SharedAffinity: local cache, single-flight claims, the breaker, renewals and rebinds."""

# The store contract names its deadline parameter `timeout`; the test twin keeps that name.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.store import (
    LEAST_BOUND,
    Binding,
    Candidate,
    Renewal,
    Spread,
    StoreTimeout,
    StoreUnavailable,
)
from gateway.config_service import AffinitySettings
from gateway.selection.affinity import SharedAffinity
from gateway.selection.breaker import Breaker
from gateway.shared.metrics import Metrics
from tests.support.polling import wait_until

A = Candidate("node-a", "node-a")
B = Candidate("node-b", "node-b")


class Clock:
    """A hand-driven clock for both the process (monotonic) and the store (wall time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.now)


class CountingStore(MemoryAffinityStore):
    """The memory store, counting calls and able to hold claims at a gate."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock.wall)
        self.calls: dict[str, int] = {}
        self.claim_gate: asyncio.Event | None = None
        self.lookup_seconds = 0.0  # real time each look-up takes
        self.connection = asyncio.Lock()  # like a pool of one connection

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def lookup(self, api_key_id: str, model: str, *, timeout: float) -> Binding | None:
        self._count("lookup")
        async with self.connection:
            await asyncio.sleep(self.lookup_seconds)
        return await super().lookup(api_key_id, model, timeout=timeout)

    async def claim(
        self,
        api_key_id: str,
        model: str,
        *,
        acceptable: Collection[str],
        preferred: Sequence[Candidate],
        ttl_seconds: float,
        timeout: float,
        spread: Spread = LEAST_BOUND,
    ) -> Binding:
        self._count("claim")
        if self.claim_gate is not None:
            await self.claim_gate.wait()
        return await super().claim(
            api_key_id,
            model,
            acceptable=acceptable,
            preferred=preferred,
            ttl_seconds=ttl_seconds,
            timeout=timeout,
            spread=spread,
        )

    async def renew_many(
        self, renewals: Collection[Renewal], *, ttl_seconds: float, timeout: float
    ) -> set[tuple[str, str]]:
        self._count("renew_many")
        return await super().renew_many(renewals, ttl_seconds=ttl_seconds, timeout=timeout)

    async def renew(
        self, api_key_id: str, model: str, *, provider: str, ttl_seconds: float, timeout: float
    ) -> bool:
        self._count("renew")
        return await super().renew(
            api_key_id, model, provider=provider, ttl_seconds=ttl_seconds, timeout=timeout
        )


async def no_wait(seconds: float) -> None:
    """The renewal linger, skipped: these tests drive time by hand."""
    await asyncio.sleep(0)


@pytest.fixture
def clock() -> Clock:
    """A fresh hand-driven clock."""
    return Clock()


@pytest.fixture
async def affinity(clock: Clock) -> AsyncIterator[SharedAffinity]:
    """SharedAffinity over a counting memory store, its background worker running."""
    shared = SharedAffinity(
        CountingStore(clock),
        AffinitySettings(ttl_seconds=300, local_cache_seconds=5, breaker_cooloff_seconds=10),
        Metrics(),
        clock=clock.monotonic,
        sleep=no_wait,
    )
    await shared.start()
    store_of(shared).calls.clear()  # start-up probes are not what these tests count
    yield shared
    await shared.stop()


def store_of(affinity: SharedAffinity) -> CountingStore:
    """The counting store behind the affinity."""
    assert isinstance(affinity.store, CountingStore)
    return affinity.store


async def test_lookup_is_served_from_the_local_cache_until_it_ages(
    affinity: SharedAffinity, clock: Clock
) -> None:
    """Within local_cache_seconds a binding is read once; after that the store is asked again."""
    await affinity.claim("key", "m", preferred=[A], acceptable=["node-a"])
    for _ in range(5):
        assert (await affinity.lookup("key", "m")).binding is not None
    assert store_of(affinity).calls.get("lookup", 0) == 0
    clock.now += 6
    lookup = await affinity.lookup("key", "m")
    assert lookup.binding is not None
    assert lookup.binding.provider == "node-a"
    assert store_of(affinity).calls["lookup"] == 1


async def test_concurrent_misses_collapse_into_one_claim(affinity: SharedAffinity) -> None:
    """Ten concurrent claims for one (key, model) in one process reach the store once."""
    store = store_of(affinity)
    store.claim_gate = asyncio.Event()
    claims = [
        asyncio.create_task(affinity.claim("key", "m", preferred=[A, B], acceptable=["node-a"]))
        for _ in range(10)
    ]
    await wait_until(lambda: store.calls.get("claim", 0) == 1, message="the first claim")
    store.claim_gate.set()
    results = await asyncio.gather(*claims)
    assert {result.binding.provider for result in results if result.binding} == {"node-a"}
    assert store.calls["claim"] == 1


async def test_store_failure_opens_the_breaker_and_degrades(
    affinity: SharedAffinity, clock: Clock
) -> None:
    """Failing look-ups are degraded; three in a row stop store calls until the cool-off ends."""
    store = store_of(affinity)
    store.fail_with(StoreUnavailable("down"))
    for attempt in range(3):
        assert affinity.breaker.state() == "closed", attempt
        assert (await affinity.lookup("key", "m")).degraded
    assert affinity.breaker.state() == "open"
    calls = store.calls["lookup"]
    assert (await affinity.lookup("key", "m")).degraded
    assert store.calls["lookup"] == calls  # open: not even tried
    store.fail_with(None)
    clock.now += 10
    assert affinity.breaker.state() == "half_open"
    lookup = await affinity.lookup("key", "m")
    assert not lookup.degraded
    assert affinity.breaker.state() == "closed"


def test_one_success_resets_the_count_of_failures() -> None:
    """Failures must be consecutive to open the breaker."""
    breaker = Breaker(10, lambda: 0.0, failure_threshold=2)
    breaker.failed()
    breaker.succeeded()
    breaker.failed()
    assert breaker.state() == "closed"
    breaker.failed()
    assert breaker.state() == "open"


def test_half_open_breaker_lets_one_probe_through() -> None:
    """After the cool-off exactly one call may probe; a failed probe opens it again."""
    now = [0.0]
    breaker = Breaker(10, lambda: now[0], failure_threshold=1)
    breaker.failed()
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()
    assert not breaker.allow()
    breaker.failed()
    assert breaker.state() == "open"
    now[0] = 20.0
    assert breaker.allow()
    breaker.abandoned()
    assert breaker.allow()


async def test_timeouts_count_as_failures(affinity: SharedAffinity) -> None:
    """Store deadline misses open the breaker like errors do."""
    store_of(affinity).fail_with(StoreTimeout("slow"))
    for _ in range(3):
        assert (await affinity.claim("key", "m", preferred=[A], acceptable=["node-a"])).degraded
    assert affinity.breaker.state() == "open"


async def test_renewal_is_queued_only_when_less_than_half_the_ttl_remains(
    affinity: SharedAffinity, clock: Clock
) -> None:
    """A success early in the TTL renews nothing; past half-time it renews once."""
    store = store_of(affinity)
    bound = (await affinity.claim("key", "m", preferred=[A], acceptable=["node-a"])).binding
    assert bound is not None
    assert not affinity.served("key", "m", bound=bound, served=A)
    clock.now += 100
    affinity.served("key", "m", bound=bound, served=A)
    assert store.calls.get("renew_many", 0) == 0
    clock.now += 60  # 160 s of 300 gone: under half remains
    affinity.served("key", "m", bound=bound, served=A)
    affinity.served("key", "m", bound=bound, served=A)
    await wait_until(lambda: store.calls.get("renew_many", 0) == 1, message="one renewal batch")
    assert store.calls.get("renew", 0) == 1
    binding = await store.lookup("key", "m", timeout=1)
    assert binding is not None
    assert binding.ttl_remaining == pytest.approx(300)


async def test_failover_rebinds_with_compare_and_set(affinity: SharedAffinity) -> None:
    """Served by another provider than the bound one: the binding moves to it."""
    store = store_of(affinity)
    bound = (await affinity.claim("key", "m", preferred=[A], acceptable=["node-a"])).binding
    assert bound is not None
    assert affinity.served("key", "m", bound=bound, served=B)
    cached = affinity.cached("key", "m")
    assert cached is not None
    assert cached.provider == "node-b"

    async def moved() -> bool:
        binding = await store.lookup("key", "m", timeout=1)
        return binding is not None and binding.provider == "node-b"

    await wait_until(moved, message="the rebind to land")


async def test_full_renew_queue_drops_and_counts(clock: Clock) -> None:
    """With the queue full, further renewals are dropped and counted, never awaited."""
    metrics = Metrics()
    shared = SharedAffinity(
        CountingStore(clock), AffinitySettings(renew_queue_size=1), metrics, clock=clock.monotonic
    )  # not started: nothing drains the queue
    bound = (await shared.claim("key", "m", preferred=[A], acceptable=["node-a"])).binding
    assert bound is not None
    for _ in range(3):
        shared.served("key", "m", bound=bound, served=B)
    drops = metrics.registry.get_sample_value("gateway_renew_drops_total", {"reason": "queue_full"})
    assert drops == 2


async def test_degraded_lookup_falls_back_to_the_last_binding_seen(
    affinity: SharedAffinity, clock: Clock
) -> None:
    """With the store down, a binding seen before (and not expired) still steers the request."""
    await affinity.claim("key", "m", preferred=[B], acceptable=["node-b"])
    clock.now += 6  # no longer fresh enough to skip the store
    store_of(affinity).fail_with(StoreUnavailable("down"))
    lookup = await affinity.lookup("key", "m")
    assert lookup.degraded
    assert lookup.binding is not None
    assert lookup.binding.provider == "node-b"
    clock.now += 300  # expired: nothing left to go on
    assert (await affinity.lookup("key", "m")).binding is None


async def test_concurrent_lookups_share_one_read(affinity: SharedAffinity, clock: Clock) -> None:
    """Fifty concurrent look-ups of one (key, model) reach the store once."""
    await affinity.claim("key", "m", preferred=[A], acceptable=["node-a"])
    clock.now += 6  # the local copy is stale: the store must be asked
    store = store_of(affinity)
    results = await asyncio.gather(*(affinity.lookup("key", "m") for _ in range(50)))
    assert {result.binding.provider for result in results if result.binding} == {"node-a"}
    assert store.calls["lookup"] == 1


async def test_a_cancelled_claimer_does_not_cancel_the_others(affinity: SharedAffinity) -> None:
    """If the request making the shared claim goes away, a waiting request claims by itself."""
    store = store_of(affinity)
    store.claim_gate = asyncio.Event()
    leader = asyncio.create_task(affinity.claim("key", "m", preferred=[A], acceptable=["node-a"]))
    await wait_until(lambda: store.calls.get("claim", 0) == 1, message="the leader's claim")
    follower = asyncio.create_task(affinity.claim("key", "m", preferred=[B], acceptable=["node-b"]))
    await asyncio.sleep(0)  # let the follower start waiting on the leader
    leader.cancel()
    await wait_until(lambda: store.calls.get("claim", 0) == 2, message="the follower's claim")
    store.claim_gate.set()
    result = await follower
    assert result.binding is not None
    assert result.binding.provider == "node-b"
    assert leader.cancelled()


@dataclass
class FakeFeed:
    """A change feed whose state the test sets."""

    verified: bool = True
    generation: int = 1
    changes_heard: int = 0


async def test_a_copy_covered_by_the_change_feed_outlives_cache_age_and_ttl(
    affinity: SharedAffinity, clock: Clock
) -> None:
    """While the feed hears every change, a local copy is used without asking the store."""
    affinity.follow(FakeFeed())
    await affinity.claim("key", "m", preferred=[A], acceptable=["node-a"])
    clock.now += 600  # past local_cache_seconds and the binding's own TTL
    lookup = await affinity.lookup("key", "m")
    assert lookup.binding is not None
    assert lookup.binding.provider == "node-a"
    assert store_of(affinity).calls.get("lookup", 0) == 0


async def test_a_heard_change_drops_the_local_copy(affinity: SharedAffinity) -> None:
    """After a change notification the next look-up reads the store again."""
    affinity.follow(FakeFeed())
    await affinity.claim("key", "m", preferred=[A], acceptable=["node-a"])
    affinity.changed("key", "m")
    assert (await affinity.lookup("key", "m")).binding is not None
    assert store_of(affinity).calls["lookup"] == 1


async def test_losing_the_feed_falls_back_to_the_local_cache_age(
    affinity: SharedAffinity, clock: Clock
) -> None:
    """Copies read under an earlier generation of the feed are fresh for local_cache_seconds."""
    feed = FakeFeed()
    affinity.follow(feed)
    await affinity.claim("key", "m", preferred=[A], acceptable=["node-a"])
    feed.verified, feed.generation = False, 2
    clock.now += 6
    assert (await affinity.lookup("key", "m")).binding is not None
    assert store_of(affinity).calls["lookup"] == 1
    feed.verified, feed.generation = True, 3  # back, but the old copies were not covered
    clock.now += 6
    await affinity.lookup("key", "m")
    assert store_of(affinity).calls["lookup"] == 2


async def test_a_change_heard_during_a_read_leaves_the_copy_uncovered(
    affinity: SharedAffinity, clock: Clock
) -> None:
    """A change heard while a claim was in flight may be newer than its answer: not trusted."""
    feed = FakeFeed()
    affinity.follow(feed)
    store = store_of(affinity)
    store.claim_gate = asyncio.Event()
    claim = asyncio.create_task(affinity.claim("key", "m", preferred=[A], acceptable=["node-a"]))
    await wait_until(lambda: store.calls.get("claim", 0) == 1, message="the claim to start")
    feed.changes_heard += 1
    store.claim_gate.set()
    await claim
    clock.now += 6
    await affinity.lookup("key", "m")
    assert store.calls["lookup"] == 1


async def test_a_renewal_that_finds_no_binding_forgets_the_copy(
    affinity: SharedAffinity, clock: Clock
) -> None:
    """A covered copy whose row was purged is dropped once its renewal finds nothing."""
    affinity.follow(FakeFeed())
    store = store_of(affinity)
    bound = (await affinity.claim("key", "m", preferred=[A], acceptable=["node-a"])).binding
    assert bound is not None
    clock.now += 400  # expired in the store ...
    assert await store.purge_expired(grace_seconds=0, batch_size=10, timeout=1) == 1
    affinity.served("key", "m", bound=bound, served=A)  # ... so this renewal finds no row
    await wait_until(lambda: affinity.cached("key", "m") is None, message="the copy dropped")


def test_calls_failing_together_count_as_one_failure() -> None:
    """Failures of calls already in flight when a failure was counted do not count again."""
    now = [0.0]
    breaker = Breaker(10, lambda: now[0], failure_threshold=3)
    now[0] = 1.0
    for _ in range(30):  # thirty calls begun at 0.5 s all miss their deadline at 1 s
        breaker.failed(0.5)
    assert breaker.state() == "closed"
    now[0] = 2.0
    breaker.failed(1.5)
    now[0] = 3.0
    breaker.failed(2.5)
    assert breaker.state() == "open"


async def test_a_store_slower_than_the_deadline_at_start_is_not_degraded(clock: Clock) -> None:
    """Look-ups taking 80 ms against a 50 ms deadline: the start-up probes stretch it."""
    store = CountingStore(clock)
    store.lookup_seconds = 0.08
    shared = SharedAffinity(
        store,
        AffinitySettings(lookup_timeout_ms=50),
        Metrics(),
        clock=clock.monotonic,
        connections=1,
    )
    await shared.start()
    try:
        lookups = await asyncio.gather(*(shared.lookup(f"key-{index}", "m") for index in range(5)))
        assert not any(lookup.degraded for lookup in lookups)
        assert shared.breaker.state() == "closed"
    finally:
        await shared.stop()


async def test_a_burst_waits_for_connections_without_blaming_the_store(clock: Clock) -> None:
    """Ten look-ups of 20 ms through one connection: the queue is not charged to the 50 ms
    deadline, so none is degraded; a call that finds no connection within its limit is."""
    store = CountingStore(clock)
    store.lookup_seconds = 0.02
    shared = SharedAffinity(
        store,
        AffinitySettings(lookup_timeout_ms=50),
        Metrics(),
        clock=clock.monotonic,
        sleep=no_wait,
        connections=1,
    )
    lookups = await asyncio.gather(*(shared.lookup(f"key-{index}", "m") for index in range(10)))
    assert not any(lookup.degraded for lookup in lookups)
    store.lookup_seconds = 1.2  # longer than the look-up's whole limit (1 s)
    slow = asyncio.create_task(shared.lookup("slow", "m"))
    await wait_until(store.connection.locked, message="the slow look-up")
    assert (await shared.lookup("queued", "m")).degraded  # no connection within 1 s
    assert (await slow).degraded  # its own deadline
    assert shared.breaker.state() == "closed"
