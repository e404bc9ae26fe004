"""Each worker's usage book: counts per minute, bounded, flushed in one statement."""
# The store contract takes a per-call `timeout`; the failing twin keeps its signature.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from affinity_store.store import StoreUnavailable
from affinity_store.usage import MemoryUsageStore, Tokens, UsageKey, UsageRow, span_start
from gateway.config_service import UsageSettings
from gateway.dispatch.usage import Usage
from gateway.dispatch.usage_book import UsageBook, UsageFlusher, minute_of

ALICE = UsageKey("alice", "llama", "node-a", "ok")
BOB = UsageKey("bob", "llama", "node-a", "cancelled")
NOON = datetime(2026, 12, 6, 12, 0, tzinfo=UTC).timestamp()


class Clock:
    """Unix time the test moves by hand."""

    def __init__(self) -> None:
        self.now = NOON

    def __call__(self) -> float:
        return self.now


class FailingOnce(MemoryUsageStore):
    """A store whose next add fails as an outage would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    async def add_usage(self, rows: Sequence[UsageRow], *, timeout: float) -> None:
        if self.fail:
            self.fail = False
            raise StoreUnavailable("down")
        await super().add_usage(rows, timeout=timeout)


def test_requests_of_one_minute_add_up_and_the_next_minute_starts_a_row() -> None:
    """Two answers in one minute are one row; a request without usage counts as a request."""
    clock = Clock()
    book = UsageBook(10, clock=clock)
    book.add(ALICE, Usage(100, 10, 60))
    clock.now += 30
    book.add(ALICE, None)
    clock.now += 31
    book.add(ALICE, Usage(1, 1, 0))
    rows = {(row.minute, row.key): row.tokens for row in book.take()}
    assert rows == {
        (minute_of(NOON), ALICE): Tokens(2, 100, 10, 60),
        (minute_of(NOON + 61), ALICE): Tokens(1, 1, 1, 0),
    }
    assert len(book) == 0


def test_a_full_book_drops_new_rows_and_counts_them_but_keeps_adding_to_held_ones() -> None:
    """Past max_rows no new row is made (bounded memory); existing rows still add up."""
    book = UsageBook(1, clock=Clock())
    book.add(ALICE, Usage(1, 1, 0))
    book.add(BOB, Usage(5, 5, 0))
    book.add(ALICE, Usage(1, 1, 0))
    assert [(row.key, row.tokens) for row in book.take()] == [(ALICE, Tokens(2, 2, 2, 0))]
    assert book.dropped == 1


async def test_one_flush_is_one_statement_whatever_the_rows() -> None:
    """Hundreds of rows leave in one add; an empty book writes nothing."""
    store = MemoryUsageStore()
    book = UsageBook(1000, clock=Clock())
    for index in range(300):
        book.add(UsageKey(f"key-{index}", "llama", "node-a", "ok"), Usage(1, 1, 0))
    flusher = UsageFlusher(store, book, UsageSettings())
    await flusher.flush()
    await flusher.flush()
    assert store.adds == 1
    assert len(store.rows) == 300


async def test_a_failed_flush_keeps_its_rows_for_the_next() -> None:
    """An outage loses nothing that fits: the next flush writes the rows put back."""
    store = FailingOnce()
    book = UsageBook(10, clock=Clock())
    book.add(ALICE, Usage(3, 2, 1))
    flusher = UsageFlusher(store, book, UsageSettings())
    await flusher.flush()
    assert store.rows == {}
    await flusher.flush()
    assert list(store.rows.values()) == [Tokens(1, 3, 2, 1)]


async def test_the_janitor_deletes_minutes_past_the_retention() -> None:
    """Rows older than retention_days go (the minute, its two spans, its total); younger ones
    stay."""
    clock = Clock()
    store = MemoryUsageStore()
    old = minute_of(NOON) - timedelta(days=2)
    await store.add_usage(
        [UsageRow(old, ALICE, Tokens(1)), UsageRow(minute_of(NOON), ALICE, Tokens(1))],
        timeout=1,
    )
    flusher = UsageFlusher(store, UsageBook(10), UsageSettings(retention_days=1), clock=clock)
    assert await flusher.purge() == 4
    assert list(store.rows) == [(minute_of(NOON), ALICE)]
    assert {start for _, start, _ in store.spans} == {
        span_start(minute_of(NOON), 10),
        span_start(minute_of(NOON), 60),
    }
    assert list(store.minute_totals) == [minute_of(NOON)]
