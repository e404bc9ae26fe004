"""Binding changes heard through LISTEN/NOTIFY, directly and beside a PgBouncer pool."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from affinity_store.notifications import BindingChanges
from affinity_store.postgres import Pool, create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import Candidate
from gateway.config import Settings
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import settings_dict
from tests.support.polling import wait_until

pytestmark = pytest.mark.timeout(60)

ALPHA = Candidate("alpha", "alpha")
BETA = Candidate("beta", "beta")
TIMEOUT = 5.0


@pytest.fixture
async def direct_pool(database_url: str) -> AsyncIterator[Pool]:
    """A small pool straight to the test database."""
    pool = await create_pool(database_url, min_size=1, max_size=3, statement_cache_size=100)
    yield pool
    await pool.close()


async def listen(url: str, pool: Pool) -> tuple[BindingChanges, list[tuple[str, str]]]:
    """A started listener and the changes it reports."""
    heard: list[tuple[str, str]] = []
    changes = BindingChanges(url, pool, lambda key, model: heard.append((key, model)))
    await changes.start()
    return changes, heard


async def test_claims_and_rebinds_from_another_pool_are_heard(
    database_url: str, direct_pool: Pool
) -> None:
    """A listener verifies itself at start and hears every provider change, not renewals."""
    changes, heard = await listen(database_url, direct_pool)
    writer_pool = await create_pool(database_url, min_size=1, max_size=2, statement_cache_size=0)
    try:
        assert changes.verified
        writer = PostgresAffinityStore(writer_pool)
        await writer.claim(
            "key-1", "m", acceptable={"alpha"}, preferred=[ALPHA], ttl_seconds=60, timeout=TIMEOUT
        )
        await wait_until(lambda: heard == [("key-1", "m")], message="the claim's notification")
        await writer.renew("key-1", "m", provider="alpha", ttl_seconds=60, timeout=TIMEOUT)
        await writer.rebind(
            "key-1", "m", old_provider="alpha", new=BETA, ttl_seconds=60, timeout=TIMEOUT
        )
        await wait_until(lambda: len(heard) == 2, message="the rebind's notification")
        assert heard == [("key-1", "m"), ("key-1", "m")]
        assert changes.changes_heard == 2
    finally:
        await changes.stop()
        await writer_pool.close()


async def test_a_direct_listener_verifies_through_a_pgbouncer_pool(
    database_url: str, pgbouncer_database_url: str
) -> None:
    """Writers behind transaction-pooling PgBouncer still reach a direct listener."""
    pool = await create_pool(pgbouncer_database_url, min_size=1, max_size=2, statement_cache_size=0)
    changes, heard = await listen(database_url, pool)
    try:
        assert changes.verified
        await PostgresAffinityStore(pool).claim(
            "key", "m", acceptable={"alpha"}, preferred=[ALPHA], ttl_seconds=60, timeout=TIMEOUT
        )
        await wait_until(lambda: heard == [("key", "m")], message="the notification")
    finally:
        await changes.stop()
        await pool.close()


async def test_a_lost_listener_stops_vouching_then_recovers(
    database_url: str, direct_pool: Pool
) -> None:
    """When its connection dies the listener is unverified at once, then verifies again."""
    changes, _ = await listen(database_url, direct_pool)
    try:
        first_generation = changes.generation
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'affinity-gateway-listener' "
                "AND datname = current_database()"
            )
        finally:
            await admin.close()
        # The generation moves on each change of state, so the loss is seen even when the
        # listener has reconnected before the first poll (it reconnects at once after a loss).
        await wait_until(
            lambda: changes.generation >= first_generation + 1, message="the listener to notice"
        )
        await wait_until(
            lambda: changes.verified and changes.generation >= first_generation + 2,
            timeout=15,
            message="the listener to recover",
        )
    finally:
        await changes.stop()


async def test_an_unreachable_listener_never_vouches(direct_pool: Pool) -> None:
    """A listen URL nobody answers leaves the feed unverified (local copies age as before)."""
    changes, _ = await listen("postgresql://nobody@127.0.0.1:9/none", direct_pool)
    try:
        assert not changes.verified
    finally:
        await changes.stop()


async def test_a_gateway_reports_its_change_feed_in_metrics(
    database_url: str, start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """A gateway on Postgres listens at start-up and says so in its gauge."""
    node = await start_simulator("node-a")
    config = settings_dict({"node-a": node.url}, extra={"database": {"url": database_url}})
    server = await start_gateway(Settings.model_validate(config))
    async with (
        aiohttp.ClientSession() as session,
        session.get(server.make_url("/metrics")) as response,
    ):
        text = await response.text()
    assert "gateway_affinity_change_feed_verified 1.0" in text
