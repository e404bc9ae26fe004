"""Postgres-only behaviour: claim races, lock behaviour, outages, the janitor, error mapping."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from affinity_store.embedded import EmbeddedPostgres
from affinity_store.locks import (
    JANITOR_LOCK_KEY,
    MAINTENANCE_NAMESPACE,
    NAMESPACE,
    binding_lock_key,
)
from affinity_store.postgres import Pool, create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import Candidate, StoreError, StoreTimeout, StoreUnavailable
from tests.support.polling import wait_until

pytestmark = pytest.mark.timeout(60)

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
TTL = 300.0
TIMEOUT = 5.0
CAP = 1000  # stored responses a key keeps
ALPHA = Candidate("alpha", "alpha")

_WAITING_FOR_LOCK = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND NOT granted AND classid::int8 = $1 AND objid::int8 = $2
"""


async def all_waiting_for_binding_lock(
    connection: asyncpg.Connection[asyncpg.Record], key: str, expected: int
) -> bool:
    """Tell whether exactly `expected` sessions wait for the advisory lock of `(key, "m")`."""
    as_unsigned = binding_lock_key(key, "m") & 0xFFFFFFFF
    waiting: int = await connection.fetchval(_WAITING_FOR_LOCK, NAMESPACE, as_unsigned)
    return waiting == expected


@pytest.fixture
async def control(database_url: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A connection of the test's own, apart from any store's pool."""
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


@pytest.fixture
async def pools(database_url: str) -> AsyncIterator[list[Pool]]:
    """Twenty single-connection pools, as if twenty workers."""
    opened = await asyncio.gather(
        *(
            create_pool(database_url, min_size=1, max_size=1, statement_cache_size=100)
            for _ in range(20)
        )
    )
    yield list(opened)
    await asyncio.gather(*(pool.close() for pool in opened))


async def count_rows(connection: asyncpg.Connection[asyncpg.Record]) -> int:
    """Count every row of the bindings table, live or not."""
    count: int = await connection.fetchval("SELECT count(*) FROM affinity_bindings")
    return count


async def test_twenty_racing_claims_agree_on_one_provider(
    pools: list[Pool], control: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Twenty workers proposing twenty providers, released together, all get one binding."""
    every_provider = {f"provider-{index}" for index in range(20)}
    async with control.transaction():
        await control.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", NAMESPACE, binding_lock_key("k", "m")
        )
        claims = [
            asyncio.create_task(
                PostgresAffinityStore(pool).claim(
                    "k",
                    "m",
                    acceptable=every_provider,
                    preferred=[Candidate(f"provider-{index}", f"provider-{index}")],
                    ttl_seconds=TTL,
                    timeout=30,
                )
            )
            for index, pool in enumerate(pools)
        ]
        await wait_until(
            lambda: all_waiting_for_binding_lock(control, "k", 20),
            timeout=20,
            message="20 claims waiting",
        )
    bindings = await asyncio.gather(*claims)
    assert len({binding.provider for binding in bindings}) == 1
    assert await count_rows(control) == 1


@pytest.mark.timeout(90)
async def test_claims_racing_from_separate_processes_agree(
    database_url: str, control: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Four OS processes with five claims each, released together, all get one binding."""
    processes_count, claims_each = 4, 5
    total = processes_count * claims_each
    async with control.transaction():
        await control.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", NAMESPACE, binding_lock_key("k", "m")
        )
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.integration.claim_worker",
                database_url,
                "k",
                "m",
                str(number * claims_each),
                str(claims_each),
                str(total),
                cwd=REPOSITORY_ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            for number in range(processes_count)
        ]
        await wait_until(
            lambda: all_waiting_for_binding_lock(control, "k", total),
            timeout=60,
            message="all claims waiting",
        )
    outputs = await asyncio.gather(*(worker.communicate() for worker in workers))
    providers: set[str] = set()
    for worker, (stdout, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr.decode()
        providers.update(json.loads(stdout))
    assert len(providers) == 1
    assert await count_rows(control) == 1


async def test_lookup_answers_while_another_session_holds_the_key_lock(
    postgres_pool: Pool, control: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A held advisory lock does not delay lookup: the hit path never takes it."""
    store = PostgresAffinityStore(postgres_pool)
    await store.claim(
        "k", "m", acceptable={"alpha"}, preferred=[ALPHA], ttl_seconds=TTL, timeout=TIMEOUT
    )
    async with control.transaction():
        await control.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", NAMESPACE, binding_lock_key("k", "m")
        )
        started = time.monotonic()
        found = await store.lookup("k", "m", timeout=1.0)
        elapsed = time.monotonic() - started
    assert found is not None
    assert found.provider == "alpha"
    assert elapsed < 0.5


async def test_claim_behind_a_held_key_lock_hits_the_lock_timeout(
    postgres_pool: Pool, control: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A claim queued behind the key's lock gives up with StoreTimeout near its deadline."""
    store = PostgresAffinityStore(postgres_pool)
    async with control.transaction():
        await control.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", NAMESPACE, binding_lock_key("k", "m")
        )
        started = time.monotonic()
        with pytest.raises(StoreTimeout) as raised:
            await store.claim(
                "k", "m", acceptable={"alpha"}, preferred=[ALPHA], ttl_seconds=TTL, timeout=0.4
            )
        elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 1.5
    assert isinstance(raised.value.__cause__, asyncpg.LockNotAvailableError | TimeoutError)
    assert await count_rows(control) == 0


async def test_store_recovers_after_postgres_restarts(dedicated_postgres: EmbeddedPostgres) -> None:
    """With Postgres stopped a lookup fails fast as unavailable; started again, it works again."""
    pool = await create_pool(
        dedicated_postgres.url, min_size=1, max_size=2, statement_cache_size=100
    )
    try:
        store = PostgresAffinityStore(pool)
        await store.claim(
            "k", "m", acceptable={"alpha"}, preferred=[ALPHA], ttl_seconds=TTL, timeout=TIMEOUT
        )
        await asyncio.to_thread(dedicated_postgres.stop)
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises((StoreUnavailable, StoreTimeout)):
                await store.lookup("k", "m", timeout=0.2)
            assert time.monotonic() - started < 0.2 + 0.3
        await asyncio.to_thread(dedicated_postgres.start)

        async def answers() -> bool:
            """Tell whether a lookup succeeds now."""
            try:
                return await store.lookup("k", "m", timeout=1.0) is not None
            except StoreError:
                return False

        await wait_until(answers, timeout=10, message="the store answering after restart")
    finally:
        await pool.close()


async def test_lookup_against_a_silent_server_times_out_within_its_deadline() -> None:
    """A server that accepts TCP but never answers costs a lookup its deadline, not more."""
    server = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = await create_pool(
        f"postgresql://postgres@127.0.0.1:{port}/postgres",
        min_size=1,
        max_size=1,
        statement_cache_size=0,
        connect_eagerly=False,
    )
    try:
        started = time.monotonic()
        with pytest.raises(StoreTimeout):
            await PostgresAffinityStore(pool).lookup("k", "m", timeout=0.2)
        assert time.monotonic() - started < 0.2 + 0.3
    finally:
        pool.terminate()
        server.close()


async def test_driver_errors_become_store_errors(
    postgres_pool: Pool, control: asyncpg.Connection[asyncpg.Record]
) -> None:
    """A database error surfaces as StoreError carrying the driver error as its cause."""
    await control.execute("DROP TABLE affinity_bindings")
    with pytest.raises(StoreError) as raised:
        await PostgresAffinityStore(postgres_pool).lookup("k", "m", timeout=TIMEOUT)
    assert isinstance(raised.value.__cause__, asyncpg.UndefinedTableError)


async def _insert_expired(connection: asyncpg.Connection[asyncpg.Record], count: int) -> None:
    """Insert `count` bindings that expired two minutes ago."""
    await connection.execute(
        """
        INSERT INTO affinity_bindings (api_key_id, model, provider, routing_identity, expires_at)
        SELECT 'key-' || number, 'm', 'alpha', 'alpha', now() - interval '2 minutes'
        FROM generate_series(1, $1) AS number
        """,
        count,
    )


async def test_janitor_skips_when_another_janitor_holds_the_lock(
    postgres_pool: Pool, control: asyncpg.Connection[asyncpg.Record]
) -> None:
    """While the janitor lock is held elsewhere, a purge deletes nothing and returns 0."""
    await _insert_expired(control, 5)
    store = PostgresAffinityStore(postgres_pool)
    async with control.transaction():
        await control.execute(
            "SELECT pg_advisory_xact_lock($1, $2)", MAINTENANCE_NAMESPACE, JANITOR_LOCK_KEY
        )
        assert await store.purge_expired(grace_seconds=60, batch_size=2, timeout=TIMEOUT) == 0
    assert await count_rows(control) == 5
    assert await store.purge_expired(grace_seconds=60, batch_size=2, timeout=TIMEOUT) == 5
    assert await count_rows(control) == 0


async def test_concurrent_janitors_delete_each_row_once(
    pools: list[Pool], control: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Two janitors running together delete every old row exactly once between them."""
    await _insert_expired(control, 200)
    first, second = (PostgresAffinityStore(pool) for pool in pools[:2])
    deleted = await asyncio.gather(
        first.purge_expired(grace_seconds=60, batch_size=7, timeout=TIMEOUT),
        second.purge_expired(grace_seconds=60, batch_size=7, timeout=TIMEOUT),
    )
    assert sum(deleted) == 200
    assert await count_rows(control) == 0


async def test_recording_a_response_deletes_long_expired_ones(
    postgres_pool: Pool, control: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Each response write also deletes a few rows expired for over five minutes, so the table
    stays near its live size without a janitor."""
    store = PostgresAffinityStore(postgres_pool)
    for index in range(4):
        await store.record_response(
            f"old-{index}",
            "alpha",
            api_key_id="k",
            ttl_seconds=TTL,
            max_per_key=CAP,
            timeout=TIMEOUT,
        )
    await control.execute("UPDATE response_bindings SET expires_at = now() - interval '10 minutes'")
    await store.record_response(
        "new", "alpha", api_key_id="k", ttl_seconds=TTL, max_per_key=CAP, timeout=TIMEOUT
    )
    remaining = await control.fetch("SELECT response_id FROM response_bindings")
    assert [row["response_id"] for row in remaining] == ["new"]
