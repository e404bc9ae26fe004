"""The router's shortcut for a lone candidate held by a cached binding: the general decision."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from affinity_store.memory_store import MemoryAffinityStore
from gateway.catalog import Catalog, Key, Provider
from gateway.config import Settings
from gateway.config_service import AffinitySettings
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.load import LoadPoller
from gateway.dispatch.permits import ProviderPermits
from gateway.selection.affinity import SharedAffinity
from gateway.selection.router import RequestContext, Router
from gateway.shared.metrics import Metrics
from tests.support.gateway import TEST_MODEL, settings_dict

NODES = {"node-a": "http://127.0.0.1:9001", "node-b": "http://127.0.0.1:9002"}


@dataclass
class Routing:
    """A router over two providers, its catalog and the health it reads."""

    router: Router
    catalog: Catalog
    health: ProviderHealth
    affinity: SharedAffinity


@pytest.fixture
async def routing() -> AsyncIterator[Routing]:
    """A router as a worker builds it, over the in-memory binding store."""
    config = settings_dict(NODES, extra={"groups": {"fast": ["node-b"], "empty": []}})
    config["keys"][0]["model_group_preferences"] = {"other-model": "missing"}
    config["keys"][1]["model_group_preferences"] = {"other-model": "fast"}
    settings = Settings.model_validate(config)
    catalog = Catalog(settings)
    metrics = Metrics()
    affinity = SharedAffinity(MemoryAffinityStore(), AffinitySettings(), metrics)
    permits = ProviderPermits(catalog.providers)
    health = ProviderHealth(
        settings.routing,
        serving={model: [p.name for p in ps] for model, ps in catalog.serving.items()},
    )
    async with aiohttp.ClientSession() as session:
        load = LoadPoller(session, catalog.providers, permits.in_flight, interval=60)
        router = Router(
            catalog,
            settings.routing,
            spill=settings.affinity.spill,
            affinity=affinity,
            health=health,
            permits=permits,
            load=load,
            metrics=metrics,
            seed=7,
        )
        yield Routing(router, catalog, health, affinity)


def context(key: Key, model: str) -> RequestContext:
    """A request of `key` for `model`."""
    return RequestContext(request_id="r-1", key=key, model=model, stream=True)


async def bind(routing: Routing, key: Key, model: str, provider: Provider) -> None:
    """Bind the key's model to the provider, as a first request's claim does."""
    decision = await routing.router.decide(context(key, model), [provider])
    assert decision.affinity == "miss"
    assert routing.affinity.cached(key.id, model) is not None


async def test_a_bound_lone_candidate_gets_the_general_decision(routing: Routing) -> None:
    """Healthy or cooling, a lone candidate its cached binding holds is decided as in general."""
    key = routing.catalog.keys["team-a"]
    provider = routing.catalog.providers["node-a"]
    await bind(routing, key, TEST_MODEL, provider)
    for cooling in (False, True):
        if cooling:
            routing.health.rate_limited(provider.name, 30)
        shortcut = routing.router._lone_bound(key, TEST_MODEL, provider)
        general = await routing.router._ordered(context(key, TEST_MODEL), [provider])
        assert shortcut is not None
        assert shortcut == general
        assert shortcut.affinity == "hit"
        assert shortcut.reasons == ["cooling" if cooling else "only"]
        assert await routing.router.decide(context(key, TEST_MODEL), [provider]) == general


async def test_the_shortcut_leaves_every_other_case_to_the_general_path(routing: Routing) -> None:
    """No cached binding, a binding elsewhere, or a preference for the model: no shortcut."""
    team_a, team_b = routing.catalog.keys["team-a"], routing.catalog.keys["team-b"]
    node_a, node_b = routing.catalog.providers["node-a"], routing.catalog.providers["node-b"]
    assert routing.router._lone_bound(team_a, TEST_MODEL, node_a) is None  # nothing bound yet
    await bind(routing, team_a, TEST_MODEL, node_a)
    assert routing.router._lone_bound(team_a, TEST_MODEL, node_b) is None  # bound elsewhere
    for key in (team_a, team_b):  # a preference, for a missing group or a real one
        await bind(routing, key, "other-model", node_b)
        assert routing.affinity.cached(key.id, "other-model") is not None
        assert routing.router._lone_bound(key, "other-model", node_b) is None
