"""Reload planning: which settings apply live, which keep their running value; the per-process
state a reload reconfigures (permits, health) and the catalog's draining filter."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.permits import ProviderPermits
from gateway.operations.reload import RESTART_ONLY, keep_restart_only
from tests.support.gateway import TEST_MODEL, settings_dict

NODES = {"node-a": "http://127.0.0.1:9001", "node-b": "http://127.0.0.1:9002"}


def settings(**extra: Any) -> Settings:
    """Two providers and the test keys, with section overrides."""
    return Settings.model_validate(settings_dict(NODES, extra=extra))


def test_live_changes_apply_and_nothing_needs_a_restart() -> None:
    """Keys, providers, limits and per-request routing settings change with no restart needed."""
    running = settings()
    config = settings_dict(NODES, extra={"routing": {"failover_budget": 1}})
    config["providers"][0]["max_concurrency"] = 3
    config["providers"][1]["draining"] = True
    config["keys"] = config["keys"][:1]
    config["server"]["admin_token"] = "a-new-admin-token"
    config["server"]["drain_delay_seconds"] = 1
    config["server"]["max_connection_share_per_key"] = 0.25
    new = Settings.model_validate(config)
    effective, restart_needed = keep_restart_only(running, new)
    assert restart_needed == ()
    assert effective == new


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("server.port", 9999),
        ("server.workers", 7),
        ("server.max_connections_per_worker", 5),
        ("database", {"url": "postgresql://elsewhere/db"}),
        ("affinity", {"ttl_seconds": 10}),
        ("routing.connect_timeout_seconds", 1),
        ("routing.session_capacity", 3),
    ],
)
def test_restart_only_changes_keep_their_running_value_and_are_reported(
    path: str, value: Any
) -> None:
    """A restart-only field keeps its running value, is reported, and live changes still apply."""
    running = settings()
    section, _, field = path.partition(".")
    config = settings_dict(NODES)
    config.setdefault(section, {})
    if field:
        config[section][field] = value
    else:
        config[section] = value
    config["routing"] = {**config.get("routing", {}), "failover_budget": 2}
    new = Settings.model_validate(config)
    effective, restart_needed = keep_restart_only(running, new)
    assert restart_needed == (path,)
    current: Any = effective
    for part in path.split("."):
        current = getattr(current, part)
    expected: Any = running
    for part in path.split("."):
        expected = getattr(expected, part)
    assert current == expected
    assert effective.routing.failover_budget == 2  # the live change beside it applied


def test_every_restart_only_path_names_a_real_setting() -> None:
    """RESTART_ONLY has no typo: each path resolves on Settings."""
    running = settings()
    for path in RESTART_ONLY:
        value: Any = running
        for part in path.split("."):
            value = getattr(value, part)


def test_draining_providers_take_no_new_requests() -> None:
    """A draining provider is never a candidate; with all draining, `only_draining` says so."""
    config = settings_dict(NODES)
    config["providers"][0]["draining"] = True
    catalog = Catalog(Settings.model_validate(config))
    key = catalog.keys["team-a"]
    assert [provider.name for provider in catalog.candidates(key, TEST_MODEL)] == ["node-b"]
    assert not catalog.only_draining(key, TEST_MODEL)
    config["providers"][1]["draining"] = True
    everything_draining = Catalog(Settings.model_validate(config))
    assert everything_draining.candidates(key, TEST_MODEL) == ()
    assert everything_draining.only_draining(key, TEST_MODEL)


def test_permits_keep_in_flight_counts_across_a_reconfigure() -> None:
    """In-flight counts carry over; new limits apply; a removed busy provider can still release."""
    old = Catalog(settings())
    permits = ProviderPermits(old.providers)
    assert permits.try_acquire("node-a")
    assert permits.try_acquire("node-b")
    config = settings_dict(NODES)
    config["providers"][0]["max_concurrency"] = 1
    config["providers"] = config["providers"][:1]
    permits.reconfigure(Catalog(Settings.model_validate(config)).providers)
    assert permits.in_flight("node-a") == 1
    assert not permits.available("node-a")  # the new limit of 1 is reached
    assert permits.in_flight("node-b") == 1
    permits.release("node-b")
    permits.release("node-a")
    assert permits.in_flight("node-a") == 0
    assert permits.available("node-a")


def test_health_keeps_cooldowns_of_providers_that_stay() -> None:
    """A cooling provider still cools after a reconfigure; a removed one is forgotten."""
    now = [100.0]
    running = settings()
    health = ProviderHealth(running.routing, clock=lambda: now[0])
    health.rate_limited("node-a", 30)
    health.rate_limited("node-b", 30)
    changed = settings(routing={"cooldown_seconds": 1, "allowed_fails": 1})
    health.reconfigure(changed.routing, ["node-a"])
    assert health.cooling("node-a")
    assert not health.cooling("node-b")
    assert health.failed("node-b")  # allowed_fails is 1 now: one failure cools


def test_a_derived_embedded_database_url_is_not_a_configured_change() -> None:
    """A running embedded Postgres's URL was derived, not configured: the same config (no URL)
    needs no restart and keeps it; a configured URL that was dropped still needs one."""
    configured = settings()
    embedded = configured.database.with_embedded_url("postgresql://postgres:pw@127.0.0.1:5999/db")
    running = configured.model_copy(update={"database": embedded})
    effective, restart_needed = keep_restart_only(running, configured)
    assert restart_needed == ()
    assert effective.database == embedded
    named = settings(database={"url": "postgresql://postgres:pw@127.0.0.1:5999/db"})
    assert keep_restart_only(named, configured)[1] == ("database",)
