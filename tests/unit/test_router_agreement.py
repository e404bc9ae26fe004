"""Without the store, processes agree on each key's provider from what they all see alike."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.store import StoreUnavailable
from gateway.catalog import Catalog, Key
from gateway.config import Settings
from gateway.config_service import AffinitySettings
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.load import LoadPoller
from gateway.dispatch.permits import ProviderPermits
from gateway.selection.affinity import SharedAffinity
from gateway.selection.router import RequestContext, Router
from gateway.shared.metrics import Metrics
from tests.support.gateway import TEST_MODEL, settings_dict

NODES = {
    "node-a": "http://127.0.0.1:9001",
    "node-b": "http://127.0.0.1:9002",
    "node-c": "http://127.0.0.1:9003",
}
KEYS = 40


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build_router(session: aiohttp.ClientSession, seed: int, clock: Clock) -> Router:
    """A worker's router whose store is down, with its own tiebreak seed."""
    config = settings_dict(NODES)
    config["keys"] += [
        {"id": f"key-{index}", "key_sha256": f"{index:064x}", "models": ["*"]}
        for index in range(KEYS)
    ]
    settings = Settings.model_validate(config)
    catalog = Catalog(settings)
    metrics = Metrics()
    store = MemoryAffinityStore()
    store.fail_with(StoreUnavailable("down"))
    permits = ProviderPermits(catalog.providers)
    health = ProviderHealth(
        settings.routing,
        serving={model: [p.name for p in ps] for model, ps in catalog.serving.items()},
    )
    load = LoadPoller(session, catalog.providers, permits.in_flight, interval=1, clock=clock)
    return Router(
        catalog,
        settings.routing,
        spill=settings.affinity.spill,
        affinity=SharedAffinity(store, AffinitySettings(), metrics),
        health=health,
        permits=permits,
        load=load,
        metrics=metrics,
        clock=clock,
        seed=seed,
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session the load pollers hold (they never poll here)."""
    async with aiohttp.ClientSession() as session:
        yield session


def keys(router: Router) -> list[Key]:
    """The test's keys as the router's catalog has them."""
    return [router.catalog.keys[f"key-{index}"] for index in range(KEYS)]


async def chosen(router: Router) -> list[str]:
    """The provider each key's request is sent to first."""
    providers = router.catalog.serving[TEST_MODEL]
    picks = []
    for key in keys(router):
        context = RequestContext(request_id="r", key=key, model=TEST_MODEL, stream=False)
        decision = await router.decide(context, providers)
        assert decision.affinity == "degraded"
        picks.append(decision.failover[0].name)
    return picks


def record_noise(router: Router, fast: str, clock: Clock) -> None:
    """This process's own samples: `fast` answered in 1 ms, the others in 3 ms."""
    for name in NODES:
        for _ in range(30):
            router.latency.record(name, TEST_MODEL, 0.001 if name == fast else 0.003, clock.now)


def feed_node_figures(router: Router, ttft_by_node: dict[str, float], clock: Clock) -> None:
    """Two poll rounds of the nodes' TTFT totals, as the load poller reads them."""
    poller = router._poller
    for name, seconds in ttft_by_node.items():
        ttft = poller.readings[name].ttft
        ttft.add(clock.now - 1, 0.0, 0)
        ttft.add(clock.now, seconds * 100, 100)
        poller.readings[name].read_at = clock.now
    poller.polls += 1


async def test_private_latency_noise_does_not_split_the_agreed_provider(
    session: aiohttp.ClientSession,
) -> None:
    """Two workers whose own samples disagree on the fastest node still send each key to one
    node when the store is down."""
    clock = Clock()
    first, second = build_router(session, 1, clock), build_router(session, 2, clock)
    record_noise(first, "node-a", clock)
    record_noise(second, "node-c", clock)
    assert first.bands(TEST_MODEL, list(NODES), clock.now) != second.bands(
        TEST_MODEL, list(NODES), clock.now
    )
    first_picks, second_picks = await chosen(first), await chosen(second)
    assert first_picks == second_picks
    assert len(set(first_picks)) == 3  # rendezvous still spreads the keys


async def test_the_nodes_own_figures_steer_every_worker_alike(
    session: aiohttp.ClientSession,
) -> None:
    """A node its own metrics show slow is avoided by every worker, store or no store."""
    clock = Clock()
    first, second = build_router(session, 1, clock), build_router(session, 2, clock)
    record_noise(first, "node-c", clock)  # private noise in favour of the slow node
    for router in (first, second):
        feed_node_figures(router, {"node-a": 0.1, "node-b": 0.1, "node-c": 0.3}, clock)
    first_picks, second_picks = await chosen(first), await chosen(second)
    assert first_picks == second_picks
    assert set(first_picks) == {"node-a", "node-b"}
    assert first.bands(TEST_MODEL, list(NODES), clock.now)["node-c"] > 0


async def test_a_node_that_publishes_but_has_too_little_traffic_is_band_zero(
    session: aiohttp.ClientSession,
) -> None:
    """A node whose own histogram is read but shows too few first tokens for a figure is band 0,
    never slow on this process's old samples (it would get no traffic, so never a figure)."""
    clock = Clock()
    router = build_router(session, 1, clock)
    record_noise(router, "node-b", clock)  # own samples: node-a and node-c slower than node-b
    for name in NODES:
        for _ in range(200):
            router.latency.record(name, TEST_MODEL, 0.5 if name == "node-a" else 0.01, clock.now)
    assert (
        router.latency.bands(
            TEST_MODEL, list(NODES), clock.now, band_fraction=0.15, min_samples=20, enabled=True
        )["node-a"]
        > 0
    )
    feed_node_figures(router, {"node-b": 0.1, "node-c": 0.1}, clock)
    idle = router._poller.readings["node-a"]
    idle.ttft.add(clock.now - 1, 1.0, 5)
    idle.ttft.add(clock.now, 1.0, 5)  # read fresh, no first token in its window
    router._poller.polls += 1
    assert router.bands(TEST_MODEL, list(NODES), clock.now) == {
        "node-a": 0,
        "node-b": 0,
        "node-c": 0,
    }
