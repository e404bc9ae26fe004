"""Integration tests get their Postgres fixtures from tests/support/postgres.py.

`pytest_plugins` in tests/conftest.py registers them for every folder: `database_url`,
`postgres_pool`, `pgbouncer_database_url`, `dedicated_postgres`, `fresh_data_dir`,
`scratch_dir` and the session-scoped `postgres_for_tests`. Here: the affinity stores the
key-limit suites run on each of (`store`, over `memory_store` and `postgres_store`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.postgres import create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import AffinityStore


@pytest.fixture
async def postgres_store(database_url: str) -> AsyncIterator[AffinityStore]:
    """The Postgres affinity store on a small direct pool."""
    pool = await create_pool(database_url, min_size=1, max_size=24, statement_cache_size=100)
    yield PostgresAffinityStore(pool)
    await pool.close()


@pytest.fixture
def memory_store() -> AffinityStore:
    """The in-memory twin."""
    return MemoryAffinityStore()


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest) -> AffinityStore:
    """Each affinity store implementation in turn (a module may define its own `store`)."""
    chosen: AffinityStore = request.getfixturevalue(f"{request.param}_store")
    return chosen
