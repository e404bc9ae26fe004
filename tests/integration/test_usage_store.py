"""Usage rollups, one suite for every store: in memory, Postgres, and Postgres via PgBouncer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from affinity_store.postgres import create_pool
from affinity_store.usage import (
    MemoryUsageStore,
    MinuteUsage,
    PostgresUsageStore,
    Tokens,
    UsageKey,
    UsageRow,
    UsageStore,
)

pytestmark = pytest.mark.timeout(30)

TIMEOUT = 5.0
MINUTE = datetime(2026, 12, 6, 1, 0, tzinfo=UTC)
ALICE = UsageKey("alice", "llama", "node-a", "ok")
BOB = UsageKey("bob", "llama", "node-b", "ok")
BOB_FAILED = UsageKey("bob", "llama", "node-b", "error")


@pytest.fixture
def memory_store() -> UsageStore:
    """The in-memory twin."""
    return MemoryUsageStore()


@pytest.fixture
async def postgres_store(database_url: str) -> AsyncIterator[UsageStore]:
    """The Postgres store on a direct pool with the statement cache on."""
    pool = await create_pool(database_url, min_size=1, max_size=2, statement_cache_size=100)
    yield PostgresUsageStore(pool)
    await pool.close()


@pytest.fixture
async def pgbouncer_store(pgbouncer_database_url: str) -> AsyncIterator[UsageStore]:
    """The Postgres store through transaction-pooling PgBouncer, statement cache off."""
    pool = await create_pool(pgbouncer_database_url, min_size=1, max_size=2, statement_cache_size=0)
    yield PostgresUsageStore(pool)
    await pool.close()


@pytest.fixture(params=["memory", "postgres", "pgbouncer"])
def store(request: pytest.FixtureRequest) -> UsageStore:
    """Each usage store in turn."""
    chosen: UsageStore = request.getfixturevalue(f"{request.param}_store")
    return chosen


async def test_rows_of_one_minute_and_key_add_up(store: UsageStore) -> None:
    """Two workers' flushes of the same minute and key sum; other keys stay apart."""
    await store.add_usage(
        [
            UsageRow(MINUTE, ALICE, Tokens(2, 100, 10, 40)),
            UsageRow(MINUTE, BOB, Tokens(1, 5, 1, 0)),
        ],
        timeout=TIMEOUT,
    )
    await store.add_usage([UsageRow(MINUTE, ALICE, Tokens(3, 50, 5, 50))], timeout=TIMEOUT)
    totals = await store.usage_totals(MINUTE, timeout=TIMEOUT)
    assert totals == {ALICE: Tokens(5, 150, 15, 90), BOB: Tokens(1, 5, 1, 0)}


async def test_totals_and_minutes_start_at_the_given_minute(store: UsageStore) -> None:
    """Minutes before `since` are left out; per-minute sums come oldest first."""
    rows = [
        UsageRow(MINUTE - timedelta(minutes=2), ALICE, Tokens(1, 1, 1, 1)),
        UsageRow(MINUTE, ALICE, Tokens(1, 10, 0, 5)),
        UsageRow(MINUTE + timedelta(minutes=1), BOB, Tokens(2, 20, 0, 0)),
        UsageRow(MINUTE + timedelta(minutes=1), BOB_FAILED, Tokens(1, 0, 0, 0)),
    ]
    await store.add_usage(rows, timeout=TIMEOUT)
    assert await store.usage_totals(MINUTE, timeout=TIMEOUT) == {
        ALICE: Tokens(1, 10, 0, 5),
        BOB: Tokens(2, 20, 0, 0),
        BOB_FAILED: Tokens(1, 0, 0, 0),
    }
    assert await store.usage_by_minute(MINUTE, timeout=TIMEOUT) == [
        MinuteUsage(MINUTE, Tokens(1, 10, 0, 5)),
        MinuteUsage(MINUTE + timedelta(minutes=1), Tokens(3, 20, 0, 0)),
    ]


async def test_purge_deletes_only_rows_before_the_cutoff_in_batches(store: UsageStore) -> None:
    """Expired rows of every table go, at most a batch of each per call; the rest stay."""
    old = [
        UsageRow(MINUTE - timedelta(days=40, minutes=index), ALICE, Tokens(1)) for index in range(5)
    ]
    await store.add_usage([*old, UsageRow(MINUTE, ALICE, Tokens(1))], timeout=TIMEOUT)
    cutoff = MINUTE - timedelta(days=35)
    # 5 minute rows, 4 spans (the 00:50 and 01:00 tens, the 00:00 and 01:00 hours), 5 totals.
    assert await store.purge_usage(cutoff, batch_size=3, timeout=TIMEOUT) == 3 + 3 + 3
    assert await store.purge_usage(cutoff, batch_size=3, timeout=TIMEOUT) == 2 + 1 + 2
    assert await store.purge_usage(cutoff, batch_size=3, timeout=TIMEOUT) == 0
    since = MINUTE - timedelta(days=60)
    assert await store.usage_totals(since, timeout=TIMEOUT) == {ALICE: Tokens(1)}
    assert await store.usage_by_minute(since, timeout=TIMEOUT) == [MinuteUsage(MINUTE, Tokens(1))]


async def test_totals_from_any_moment_equal_the_sum_of_its_minutes(store: UsageStore) -> None:
    """Read from minutes, 10-minute spans and hours, the totals from any moment (on or between
    minute, span and hour boundaries) equal the sum of the minutes from that moment on."""
    rows = [
        UsageRow(
            MINUTE + timedelta(minutes=minute), key, Tokens(1, minute + 100, minute % 7, key_index)
        )
        for minute in range(-75, 140, 4)
        for key_index, key in enumerate((ALICE, BOB, BOB_FAILED))
        if (minute + key_index) % 3
    ]
    # Two flushes, the second adding to rows and spans the first wrote.
    await store.add_usage(rows[::2], timeout=TIMEOUT)
    await store.add_usage(rows[1::2], timeout=TIMEOUT)
    for offset in (-80, -75, -61, -60, -59, -50, -31, -1, 0, 1, 9, 10, 59, 60, 61, 137, 200):
        for seconds in (0, 1, 59):
            since = MINUTE + timedelta(minutes=offset, seconds=seconds)
            expected: dict[UsageKey, Tokens] = {}
            for row in rows:
                if row.minute >= since:
                    expected[row.key] = expected.get(row.key, Tokens()) + row.tokens
            assert await store.usage_totals(since, timeout=TIMEOUT) == expected, since
            minutes: dict[datetime, Tokens] = {}
            for row in rows:
                if row.minute >= since:
                    minutes[row.minute] = minutes.get(row.minute, Tokens()) + row.tokens
            assert await store.usage_by_minute(since, timeout=TIMEOUT) == [
                MinuteUsage(minute, tokens) for minute, tokens in sorted(minutes.items())
            ], since


async def test_rows_of_one_minute_and_key_in_one_flush_add_up(store: UsageStore) -> None:
    """The same minute and key twice in one flush: summed, not refused."""
    row = UsageRow(MINUTE, ALICE, Tokens(1, 10, 1, 5))
    await store.add_usage([row, row], timeout=TIMEOUT)
    assert await store.usage_totals(MINUTE, timeout=TIMEOUT) == {ALICE: Tokens(2, 20, 2, 10)}
    assert await store.usage_by_minute(MINUTE, timeout=TIMEOUT) == [
        MinuteUsage(MINUTE, Tokens(2, 20, 2, 10))
    ]


async def test_an_empty_flush_writes_nothing(store: UsageStore) -> None:
    """No rows: no statement, no rows."""
    await store.add_usage([], timeout=TIMEOUT)
    assert await store.usage_totals(MINUTE - timedelta(days=1), timeout=TIMEOUT) == {}


async def test_totals_keep_apart_only_the_fields_asked_for(store: UsageStore) -> None:
    """Grouped by key only, a key's models, providers and outcomes are summed, under `""`."""
    await store.add_usage(
        [
            UsageRow(MINUTE, ALICE, Tokens(1, 10, 1, 5)),
            UsageRow(MINUTE, BOB, Tokens(2, 20, 2, 0)),
            UsageRow(MINUTE, BOB_FAILED, Tokens(1, 4, 0, 0)),
        ],
        timeout=TIMEOUT,
    )
    totals = await store.usage_totals(MINUTE, timeout=TIMEOUT, by=("key",))
    assert totals == {
        UsageKey("alice", "", "", ""): Tokens(1, 10, 1, 5),
        UsageKey("bob", "", "", ""): Tokens(3, 24, 2, 0),
    }
    by_outcome = await store.usage_totals(MINUTE, timeout=TIMEOUT, by=("provider", "outcome"))
    assert by_outcome[UsageKey("", "", "node-b", "ok")] == Tokens(2, 20, 2, 0)


async def test_concurrent_flushes_over_the_same_rows_in_any_order_all_count(
    database_url: str,
) -> None:
    """Six workers flushing the same keys' minutes at once, each listing them in its own order,
    wait for each other's rows, never deadlock, and every count lands."""
    keys = [UsageKey(f"key-{index}", "llama", "node-a", "ok") for index in range(40)]
    rows = [
        UsageRow(MINUTE + timedelta(minutes=minute), key, Tokens(1, 2, 3, 1))
        for minute in range(3)
        for key in keys
    ]
    orders = [rows, rows[::-1], rows[1::2] + rows[::2], rows[::-2] + rows[-2::-2]] * 2
    pool = await create_pool(database_url, min_size=6, max_size=6, statement_cache_size=0)
    try:
        store = PostgresUsageStore(pool)
        for _ in range(5):
            await asyncio.gather(*(store.add_usage(order, timeout=TIMEOUT) for order in orders))
        totals = await store.usage_totals(MINUTE, timeout=TIMEOUT, by=())
        minutes = await store.usage_by_minute(MINUTE, timeout=TIMEOUT)
    finally:
        await pool.close()
    flushes = 5 * len(orders)
    assert totals == {UsageKey("", "", "", ""): _times(len(rows) * flushes)}
    assert [usage.tokens for usage in minutes] == [_times(len(keys) * flushes)] * 3


def _times(count: int) -> Tokens:
    """`count` rows of Tokens(1, 2, 3, 1), summed."""
    return Tokens(count, 2 * count, 3 * count, count)
