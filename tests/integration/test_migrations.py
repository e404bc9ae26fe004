"""Migrations: applied once each under concurrency, giving the schema the store expects."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import zipfile
from collections.abc import AsyncIterator
from dataclasses import astuple
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from affinity_store.embedded import find_free_port
from affinity_store.migrate import apply_migrations, load_migrations
from affinity_store.postgres import create_pool
from affinity_store.store import StoreUnavailable
from affinity_store.usage import PostgresUsageStore, Tokens, UsageKey, UsageRow
from tests.support.postgres import PostgresForTests

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]

EXPECTED_COLUMNS = {
    ("api_key_id", "text", "NO"),
    ("model", "text", "NO"),
    ("provider", "text", "NO"),
    ("routing_identity", "text", "NO"),
    ("expires_at", "timestamp with time zone", "NO"),
    ("created_at", "timestamp with time zone", "NO"),
    ("updated_at", "timestamp with time zone", "NO"),
}


@pytest.fixture
async def empty_database_url(postgres_for_tests: PostgresForTests) -> AsyncIterator[str]:
    """A database with no tables at all."""
    url = await postgres_for_tests.create_database(migrated=False)
    yield url
    await postgres_for_tests.drop_database(url)


async def test_concurrent_migrators_apply_each_migration_once(empty_database_url: str) -> None:
    """Eight migrators starting together record every migration exactly once, without errors."""
    connections = [await asyncpg.connect(empty_database_url) for _ in range(8)]
    try:
        results = await asyncio.gather(*(apply_migrations(conn) for conn in connections))
        recorded = await connections[0].fetch(
            "SELECT version, name FROM schema_migrations ORDER BY version"
        )
    finally:
        await asyncio.gather(*(connection.close() for connection in connections))
    names = [migration.name for migration in load_migrations()]
    assert sorted(name for result in results for name in result) == sorted(names)
    assert sum(1 for result in results if result) == 1
    assert [record["name"] for record in recorded] == names


async def test_migrations_give_the_schema_the_store_expects(empty_database_url: str) -> None:
    """All migrations in order create the bindings table, its key and its indexes."""
    connection = await asyncpg.connect(empty_database_url)
    try:
        await apply_migrations(connection)
        columns = await connection.fetch(
            """
            SELECT column_name, data_type, is_nullable FROM information_schema.columns
            WHERE table_name = 'affinity_bindings'
            """
        )
        primary_key = await connection.fetch(
            """
            SELECT attribute.attname FROM pg_index AS index
            JOIN pg_attribute AS attribute
              ON attribute.attrelid = index.indrelid AND attribute.attnum = ANY(index.indkey)
            WHERE index.indrelid = 'affinity_bindings'::regclass AND index.indisprimary
            """
        )
        indexed_first = await connection.fetch(
            """
            SELECT attribute.attname FROM pg_index AS index
            JOIN pg_attribute AS attribute
              ON attribute.attrelid = index.indrelid AND attribute.attnum = index.indkey[0]
            WHERE index.indrelid = 'affinity_bindings'::regclass AND NOT index.indisprimary
            """
        )
        default_columns = await connection.fetch(
            """
            SELECT column_name FROM information_schema.columns
            WHERE table_name = 'affinity_bindings' AND column_default = 'now()'
            """
        )
    finally:
        await connection.close()
    assert {tuple(record.values()) for record in columns} == EXPECTED_COLUMNS
    assert {record["attname"] for record in primary_key} == {"api_key_id", "model"}
    assert {record["attname"] for record in indexed_first} == {"expires_at"}
    assert {record["column_name"] for record in default_columns} == {"created_at", "updated_at"}


async def test_a_second_run_applies_nothing(database_url: str) -> None:
    """Migrating an up-to-date database is a no-op."""
    connection = await asyncpg.connect(database_url)
    try:
        assert await apply_migrations(connection) == []
    finally:
        await connection.close()


async def test_migrations_accept_a_pool(postgres_pool: asyncpg.Pool[asyncpg.Record]) -> None:
    """A pool works as well as a connection."""
    assert await apply_migrations(postgres_pool) == []


async def test_migrating_an_unreachable_database_raises_store_unavailable() -> None:
    """Failures to reach the database surface as StoreUnavailable, not as driver errors."""
    pool = await create_pool(
        f"postgresql://postgres@127.0.0.1:{find_free_port()}/postgres",
        min_size=0,
        max_size=1,
        statement_cache_size=0,
        connect_eagerly=False,
    )
    try:
        with pytest.raises(StoreUnavailable):
            await apply_migrations(pool)
    finally:
        await pool.close()


@pytest.mark.timeout(120)
def test_the_wheel_ships_the_sql_files(tmp_path: Path) -> None:
    """The built wheel holds every migration under affinity_store/sql and the named queries."""
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=REPOSITORY_ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for migration in load_migrations():
        assert f"affinity_store/sql/{migration.name}" in names
    assert "affinity_store/queries.sql" in names
    assert "affinity_store/migration_ledger.sql" in names


async def test_the_migration_adds_up_the_minutes_counted_before_it(
    empty_database_url: str,
) -> None:
    """Minutes written before the spans' migration are read back whole after it."""
    migrations = load_migrations()
    spans = next(index for index, m in enumerate(migrations) if m.name == "0009_usage_spans.sql")
    minute_zero = datetime(2026, 12, 6, 1, 0, tzinfo=UTC)
    keys = (UsageKey("alice", "llama", "node-a", "ok"), UsageKey("bob", "llama", "node-b", "ok"))
    rows = [
        UsageRow(minute_zero + timedelta(minutes=minute), key, Tokens(1, minute + 71, 1, 0))
        for minute in range(-70, 70, 7)
        for key in keys
    ]
    pool = await create_pool(empty_database_url, min_size=1, max_size=1, statement_cache_size=0)
    try:
        await apply_migrations(pool, migrations=migrations[:spans])
        async with pool.acquire() as connection:
            await connection.executemany(
                "INSERT INTO usage_rollups VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                [(row.minute, *astuple(row.key), *astuple(row.tokens)) for row in rows],
            )
        await apply_migrations(pool)
        store = PostgresUsageStore(pool)
        since = minute_zero - timedelta(minutes=65, seconds=30)
        expected: dict[UsageKey, Tokens] = {}
        for row in rows:
            if row.minute >= since:
                expected[row.key] = expected.get(row.key, Tokens()) + row.tokens
        assert await store.usage_totals(since, timeout=5) == expected
        assert sum(
            (usage.tokens for usage in await store.usage_by_minute(since, timeout=5)),
            Tokens(),
        ) == sum(expected.values(), Tokens())
    finally:
        await pool.close()
