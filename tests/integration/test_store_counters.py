"""The binding counters equal a full count after any mix of writes, and the twins agree."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from affinity_store.memory_store import MemoryAffinityStore
from affinity_store.postgres import create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import AffinityStore, Candidate, Spread
from tests.support.postgres import run_in_fresh_loop

pytestmark = pytest.mark.timeout(300)

CANDIDATES = [
    Candidate("alpha", "alpha"),
    Candidate("beta", "beta"),
    Candidate("gamma-1", "gamma"),  # two aliases of one routing identity
    Candidate("gamma-2", "gamma"),
]
IDENTITIES = ["alpha", "beta", "gamma"]
KEYS = ["k0", "k1", "k2", "k3", "k4"]
TIMEOUT = 5.0
TTL = 300.0


@dataclass(frozen=True)
class Claim:
    key: str
    preferred: tuple[int, ...]
    acceptable: tuple[int, ...]
    slack: int


@dataclass(frozen=True)
class Rebind:
    key: str
    old: int
    new: int


@dataclass(frozen=True)
class Renew:
    key: str
    provider: int
    expire: bool  # renew into the past: the binding expires now


@dataclass(frozen=True)
class Purge:
    pass


indexes = st.integers(0, len(CANDIDATES) - 1)
operations = st.one_of(
    st.builds(
        Claim,
        st.sampled_from(KEYS),
        st.lists(indexes, min_size=1, max_size=4, unique=True).map(tuple),
        st.lists(indexes, min_size=1, max_size=4, unique=True).map(tuple),
        st.integers(0, 2),
    ),
    st.builds(Rebind, st.sampled_from(KEYS), indexes, indexes),
    st.builds(Renew, st.sampled_from(KEYS), indexes, st.booleans()),
    st.just(Purge()),
)


async def apply(store: AffinityStore, operation: object) -> object:
    """Run one operation; return what it answered (provider names or a flag)."""
    if isinstance(operation, Claim):
        binding = await store.claim(
            operation.key,
            "m",
            acceptable={CANDIDATES[index].provider for index in operation.acceptable},
            preferred=[CANDIDATES[index] for index in operation.preferred],
            ttl_seconds=TTL,
            timeout=TIMEOUT,
            spread=Spread(minimum=operation.slack),
        )
        return binding.provider
    if isinstance(operation, Rebind):
        return await store.rebind(
            operation.key,
            "m",
            old_provider=CANDIDATES[operation.old].provider,
            new=CANDIDATES[operation.new],
            ttl_seconds=TTL,
            timeout=TIMEOUT,
        )
    if isinstance(operation, Renew):
        return await store.renew(
            operation.key,
            "m",
            provider=CANDIDATES[operation.provider].provider,
            ttl_seconds=-1.0 if operation.expire else TTL,
            timeout=TIMEOUT,
        )
    return await store.purge_expired(grace_seconds=0, batch_size=2, timeout=TIMEOUT)


async def replay(database_url: str, script: list[object]) -> None:
    """Apply the script to Postgres and to the memory twin, checking after every step."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("TRUNCATE affinity_bindings, affinity_binding_counts")
    finally:
        await connection.close()
    pool = await create_pool(database_url, min_size=1, max_size=2, statement_cache_size=100)
    try:
        postgres = PostgresAffinityStore(pool)
        memory = MemoryAffinityStore()
        for step, operation in enumerate(script):
            answers = (await apply(postgres, operation), await apply(memory, operation))
            assert answers[0] == answers[1], (step, operation, answers)
            counted = await postgres.count_bindings(IDENTITIES, timeout=TIMEOUT)
            rows = await postgres.count_rows(timeout=TIMEOUT)
            assert counted == {identity: rows.get(identity, 0) for identity in IDENTITIES}, (
                step,
                operation,
            )
            assert counted == await memory.count_bindings(IDENTITIES, timeout=TIMEOUT)
    finally:
        await pool.close()


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=st.lists(operations, min_size=1, max_size=25))
def test_counters_match_a_full_count_and_the_memory_twin(
    database_url: str, script: list[object]
) -> None:
    """Claims, rebinds, renewals, expiries and purges keep every counter exact."""
    run_in_fresh_loop(replay(database_url, script))
