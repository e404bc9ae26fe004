"""Usage rollups per minute and (key, model, provider, outcome): Postgres and in-memory twins.

Workers add their counts in batches (one statement per flush, whatever the rows); readers sum
from a given minute on. Times are UTC; a row's minute is truncated to the minute. The same
statement adds every row to its 10-minute and hour spans (`SPAN_MINUTES`) and to its minute's
total over every key, so a read from any moment sums per key at most 9 minutes, 5 spans of 10
minutes and the whole hours after them, and the per-minute chart reads one row per minute.
"""

# The store contract takes a per-call `timeout`, enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

from affinity_store.postgres import Pool, store_boundary
from affinity_store.queries import load_query_set

# The fields rollups can be grouped by, in `UsageKey`'s order.
GROUPS = ("key", "model", "provider", "outcome")
# Their columns, in the same order.
_COLUMNS = ("api_key_id", "model", "provider", "outcome")
# The spans rows are pre-added over besides the minute, in minutes, finest first; each divides
# the next (the migration and `usage.sql` name the same two).
SPAN_MINUTES = (10, 60)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Slot = TypeVar("Slot")


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
        """Delete at most `batch_size` expired rows of each table (the minutes before `before`,
        the spans that start before it, the minutes' totals); return how many went."""
        ...


@dataclass(frozen=True)
class UsageQueries:
    """The named queries of `usage.sql`."""

    add_usage: str
    usage_totals: str
    usage_by_minute: str
    purge_usage: str


def span_start(moment: datetime, span_minutes: int) -> datetime:
    """The start of the span of `span_minutes` that `moment` falls in (spans count from the
    Unix epoch, UTC)."""
    width = span_minutes * 60
    seconds = (moment - _EPOCH) // timedelta(seconds=1)
    return _EPOCH + timedelta(seconds=seconds - seconds % width)


def read_bounds(since: datetime) -> tuple[datetime, datetime, datetime]:
    """Where a read from `since` on takes minutes, 10-minute spans and hours from: the first
    minute at or after `since`, then the first span boundary of each width at or after that."""
    bounds = [_ceil(since, 1)]
    for span_minutes in SPAN_MINUTES:
        bounds.append(_ceil(bounds[-1], span_minutes))
    first_minute, first_ten, first_hour = bounds
    return first_minute, first_ten, first_hour


def _ceil(moment: datetime, span_minutes: int) -> datetime:
    """The first boundary of spans of `span_minutes` at or after `moment`."""
    start = span_start(moment, span_minutes)
    return start if start == moment else start + timedelta(minutes=span_minutes)


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
        query = self._queries.usage_totals.format_map(
            {
                group: column if group in by else "''::text"
                for group, column in zip(GROUPS, _COLUMNS, strict=True)
            }
        )
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(query, *read_bounds(since))
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
        """Delete at most `batch_size` expired rows of each table; return how many went."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            gone = await connection.fetchval(self._queries.purge_usage, before, batch_size)
        return int(gone)


class MemoryUsageStore:
    """The in-memory twin, for tests and the store's shared suite: the same three tables."""

    def __init__(self) -> None:
        """Start empty."""
        self.rows: dict[tuple[datetime, UsageKey], Tokens] = {}
        self.spans: dict[tuple[int, datetime, UsageKey], Tokens] = {}
        self.minute_totals: dict[datetime, Tokens] = {}
        self.adds = 0

    async def add_usage(self, rows: Sequence[UsageRow], *, timeout: float) -> None:
        """Add every row's counts to its minute's row, its spans and its minute's total."""
        if not rows:
            return
        self.adds += 1
        for row in rows:
            _add(self.rows, (row.minute, row.key), row.tokens)
            for span_minutes in SPAN_MINUTES:
                slot = (span_minutes, span_start(row.minute, span_minutes), row.key)
                _add(self.spans, slot, row.tokens)
            _add(self.minute_totals, row.minute, row.tokens)

    async def usage_totals(
        self, since: datetime, *, timeout: float, by: Collection[str] = GROUPS
    ) -> dict[UsageKey, Tokens]:
        """Counts from minute `since` on, summed per `UsageKey` (the fields not in `by`: `""`),
        from the same minutes and spans as Postgres's."""
        first_minute, first_ten, first_hour = read_bounds(since)
        counted = [
            (key, tokens)
            for (minute, key), tokens in self.rows.items()
            if first_minute <= minute < first_ten
        ]
        for (span_minutes, start, key), tokens in self.spans.items():
            if (span_minutes == 10 and first_ten <= start < first_hour) or (
                span_minutes == 60 and start >= first_hour
            ):
                counted.append((key, tokens))
        totals: dict[UsageKey, Tokens] = {}
        for key, tokens in counted:
            kept = UsageKey(
                key.api_key_id if "key" in by else "",
                key.model if "model" in by else "",
                key.provider if "provider" in by else "",
                key.outcome if "outcome" in by else "",
            )
            _add(totals, kept, tokens)
        return totals

    async def usage_by_minute(self, since: datetime, *, timeout: float) -> list[MinuteUsage]:
        """Counts from minute `since` on, summed per minute, oldest first."""
        return [
            MinuteUsage(minute, tokens)
            for minute, tokens in sorted(self.minute_totals.items())
            if minute >= since
        ]

    async def purge_usage(self, before: datetime, *, batch_size: int, timeout: float) -> int:
        """Delete at most `batch_size` expired rows of each table; return how many went."""
        return (
            _purge(self.rows, lambda slot: slot[0] < before, batch_size)
            + _purge(self.spans, lambda slot: slot[1] < before, batch_size)
            + _purge(self.minute_totals, lambda minute: minute < before, batch_size)
        )


def _add(table: dict[Slot, Tokens], slot: Slot, tokens: Tokens) -> None:
    """Add `tokens` to `table[slot]`."""
    table[slot] = table.get(slot, Tokens()) + tokens


def _purge(table: dict[Slot, Tokens], expired: Callable[[Slot], bool], batch_size: int) -> int:
    """Delete at most `batch_size` of the table's expired slots; return how many went."""
    doomed = [slot for slot in table if expired(slot)][:batch_size]
    for slot in doomed:
        del table[slot]
    return len(doomed)
