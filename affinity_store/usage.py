"""Usage rollups per minute and (key, model, provider, outcome): Postgres and in-memory twins.

Workers add their counts in batches (one statement per flush, whatever the rows); readers sum
from a given minute on. Times are UTC; a row's minute is truncated to the minute.
"""

# The store contract takes a per-call `timeout`, enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Protocol

from affinity_store.postgres import Pool, store_boundary
from affinity_store.queries import load_query_set

# The fields rollups can be grouped by, in `UsageKey`'s order.
GROUPS = ("key", "model", "provider", "outcome")


@dataclass(frozen=True, slots=True)
class Tokens:
    """Requests and tokens by kind; adds up."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        """The sum of both, field by field."""
        return Tokens(
            self.requests + other.requests,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@dataclass(frozen=True, slots=True)
class UsageKey:
    """What a rollup row counts: one key's model on one provider, with one outcome."""

    api_key_id: str
    model: str
    provider: str
    outcome: str


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One minute's counts of one `UsageKey`."""

    minute: datetime
    key: UsageKey
    tokens: Tokens


@dataclass(frozen=True, slots=True)
class MinuteUsage:
    """Every key's counts of one minute, summed."""

    minute: datetime
    tokens: Tokens


class UsageStore(Protocol):
    """Where the rollups live."""

    async def add_usage(self, rows: Sequence[UsageRow], *, timeout: float) -> None:
        """Add every row's counts to its minute's row, in one statement."""
        ...

    async def usage_totals(
        self, since: datetime, *, timeout: float, by: Collection[str] = GROUPS
    ) -> dict[UsageKey, Tokens]:
        """Counts from minute `since` on, summed per `UsageKey`; the fields not named in `by`
        (of `GROUPS`) are `""`, summed over."""
        ...

    async def usage_by_minute(self, since: datetime, *, timeout: float) -> list[MinuteUsage]:
        """Counts from minute `since` on, summed per minute, oldest first."""
        ...

    async def purge_usage(self, before: datetime, *, batch_size: int, timeout: float) -> int:
        """Delete at most `batch_size` rows of minutes before `before`; return how many."""
        ...


@dataclass(frozen=True)
class UsageQueries:
    """The named queries of `usage.sql`."""

    add_usage: str
    usage_totals: str
    usage_by_minute: str
    purge_usage: str


def _columns(rows: Sequence[UsageRow]) -> list[list[object]]:
    """The rows as the nine arrays `add_usage` takes."""
    return [
        [row.minute for row in rows],
        [row.key.api_key_id for row in rows],
        [row.key.model for row in rows],
        [row.key.provider for row in rows],
        [row.key.outcome for row in rows],
        *([getattr(row.tokens, field.name) for row in rows] for field in fields(Tokens)),
    ]


class PostgresUsageStore:
    """Rollups in `usage_rollups`, on the store's pool; one statement per call (PgBouncer-safe)."""

    def __init__(self, pool: Pool) -> None:
        """Use `pool` (owned by the caller)."""
        self._pool = pool
        self._queries = load_query_set(UsageQueries, "usage.sql")

    async def add_usage(self, rows: Sequence[UsageRow], *, timeout: float) -> None:
        """Add every row's counts to its minute's row, in one statement."""
        if not rows:
            return
        async with store_boundary(timeout), self._pool.acquire() as connection:
            await connection.execute(self._queries.add_usage, *_columns(rows))

    async def usage_totals(
        self, since: datetime, *, timeout: float, by: Collection[str] = GROUPS
    ) -> dict[UsageKey, Tokens]:
        """Counts from minute `since` on, summed per `UsageKey` (the fields not in `by`: `""`)."""
        kept = [group in by for group in GROUPS]
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(self._queries.usage_totals, since, *kept)
        return {
            UsageKey(
                record["api_key_id"], record["model"], record["provider"], record["outcome"]
            ): Tokens(
                record["requests"],
                record["prompt_tokens"],
                record["completion_tokens"],
                record["cached_tokens"],
            )
            for record in records
        }

    async def usage_by_minute(self, since: datetime, *, timeout: float) -> list[MinuteUsage]:
        """Counts from minute `since` on, summed per minute, oldest first."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(self._queries.usage_by_minute, since)
        return [
            MinuteUsage(
                record["minute"],
                Tokens(
                    record["requests"],
                    record["prompt_tokens"],
                    record["completion_tokens"],
                    record["cached_tokens"],
                ),
            )
            for record in records
        ]

    async def purge_usage(self, before: datetime, *, batch_size: int, timeout: float) -> int:
        """Delete at most `batch_size` rows of minutes before `before`; return how many."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            status = await connection.execute(self._queries.purge_usage, before, batch_size)
        return int(status.rsplit(" ", 1)[1])


class MemoryUsageStore:
    """The in-memory twin, for tests and the store's shared suite."""

    def __init__(self) -> None:
        """Start empty."""
        self.rows: dict[tuple[datetime, UsageKey], Tokens] = {}
        self.adds = 0

    async def add_usage(self, rows: Sequence[UsageRow], *, timeout: float) -> None:
        """Add every row's counts to its minute's row."""
        if not rows:
            return
        self.adds += 1
        for row in rows:
            slot = (row.minute, row.key)
            self.rows[slot] = self.rows.get(slot, Tokens()) + row.tokens

    async def usage_totals(
        self, since: datetime, *, timeout: float, by: Collection[str] = GROUPS
    ) -> dict[UsageKey, Tokens]:
        """Counts from minute `since` on, summed per `UsageKey` (the fields not in `by`: `""`)."""
        totals: dict[UsageKey, Tokens] = {}
        for (minute, key), tokens in self.rows.items():
            if minute >= since:
                kept = UsageKey(
                    key.api_key_id if "key" in by else "",
                    key.model if "model" in by else "",
                    key.provider if "provider" in by else "",
                    key.outcome if "outcome" in by else "",
                )
                totals[kept] = totals.get(kept, Tokens()) + tokens
        return totals

    async def usage_by_minute(self, since: datetime, *, timeout: float) -> list[MinuteUsage]:
        """Counts from minute `since` on, summed per minute, oldest first."""
        minutes: dict[datetime, Tokens] = {}
        for (minute, _), tokens in self.rows.items():
            if minute >= since:
                minutes[minute] = minutes.get(minute, Tokens()) + tokens
        return [MinuteUsage(minute, tokens) for minute, tokens in sorted(minutes.items())]

    async def purge_usage(self, before: datetime, *, batch_size: int, timeout: float) -> int:
        """Delete at most `batch_size` rows of minutes before `before`; return how many."""
        doomed = [slot for slot in self.rows if slot[0] < before][:batch_size]
        for slot in doomed:
            del self.rows[slot]
        return len(doomed)
