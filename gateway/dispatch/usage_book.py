"""Usage counted per minute in each worker, and added to the store's rollups off the request path.

A finished request adds one request and its tokens to its minute's row in memory (no I/O). Every
`flush_interval_seconds` the worker adds all its rows with one statement. At most
`max_pending_rows` rows wait: past that a new row is dropped and counted, never an allocation
that grows with the traffic. A flush that fails puts its rows back (within the same bound) for
the next one. A worker that crashes loses what it counted since its last flush: at most one
interval. A janitor deletes the minutes older than `retention_days`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog

from affinity_store.store import StoreError
from affinity_store.usage import Tokens, UsageKey, UsageRow, UsageStore
from gateway.config_service import UsageSettings
from gateway.dispatch.usage import Usage
from gateway.shared.background import every, stop_task

logger = structlog.get_logger("gateway.dispatch.usage_book")

FLUSH_TIMEOUT_SECONDS = 5.0
PURGE_BATCH_SIZE = 10_000
PURGE_TIMEOUT_SECONDS = 10.0


def minute_of(unix_seconds: float) -> datetime:
    """The UTC minute a moment falls in."""
    return datetime.fromtimestamp(unix_seconds - unix_seconds % 60, UTC)


class UsageBook:
    """This worker's counts since its last flush, per minute and `UsageKey`.

    On the request path a row is a list of four counts under (minute number, key), added to in
    place: no object is made per request once its row exists.
    """

    def __init__(self, max_rows: int, *, clock: Callable[[], float] = time.time) -> None:
        """Hold at most `max_rows` rows between flushes."""
        self._max_rows = max_rows
        self._clock = clock
        # (Unix minute number, key) -> [requests, prompt, completion, cached]
        self._rows: dict[tuple[int, UsageKey], list[int]] = {}
        self.dropped = 0
        """Requests not counted because the book was full."""

    def add(self, key: UsageKey, usage: Usage | None) -> None:
        """Count one finished request and the tokens its answer reported."""
        slot = (int(self._clock()) // 60, key)
        counts = self._rows.get(slot)
        if counts is None:
            if len(self._rows) >= self._max_rows:
                self.dropped += 1
                return
            counts = self._rows[slot] = [0, 0, 0, 0]
        counts[0] += 1
        if usage is not None:
            counts[1] += usage.prompt_tokens
            counts[2] += usage.completion_tokens
            counts[3] += usage.cached_tokens

    def take(self) -> list[UsageRow]:
        """Every row counted since the last take, leaving the book empty."""
        rows, self._rows = self._rows, {}
        return [
            UsageRow(datetime.fromtimestamp(minute * 60, UTC), key, Tokens(*counts))
            for (minute, key), counts in rows.items()
        ]

    def put_back(self, rows: list[UsageRow]) -> None:
        """Rows a flush could not write, for the next flush (what does not fit is dropped)."""
        for row in rows:
            slot = (int(row.minute.timestamp()) // 60, row.key)
            counts = self._rows.get(slot)
            tokens = row.tokens
            if counts is None:
                if len(self._rows) >= self._max_rows:
                    self.dropped += tokens.requests
                    continue
                counts = self._rows[slot] = [0, 0, 0, 0]
            counts[0] += tokens.requests
            counts[1] += tokens.prompt_tokens
            counts[2] += tokens.completion_tokens
            counts[3] += tokens.cached_tokens

    def __len__(self) -> int:
        """How many rows wait for the next flush."""
        return len(self._rows)


class UsageFlusher:
    """Adds the book's rows to the store every interval, and deletes expired minutes."""

    def __init__(
        self,
        store: UsageStore,
        book: UsageBook,
        settings: UsageSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Flush `book` into `store` as `settings` say."""
        self._store = store
        self._book = book
        self._settings = settings
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.flushes = 0

    async def start(self) -> None:
        """Start the background loop."""
        self._task = asyncio.create_task(self._run(), name="usage-flusher")

    async def stop(self) -> None:
        """Stop the loop, then flush what is left once (bounded)."""
        await stop_task(self._task)
        self._task = None
        await self.flush()

    async def flush(self) -> None:
        """Write every waiting row with one statement; on failure keep them for the next."""
        rows = self._book.take()
        if not rows:
            return
        try:
            await self._store.add_usage(rows, timeout=FLUSH_TIMEOUT_SECONDS)
        except StoreError as error:
            self._book.put_back(rows)
            if not self._failing:
                logger.warning("usage_flush_failed", rows=len(rows), error=type(error).__name__)
            self._failing = True
            return
        if self._failing:
            logger.info("usage_flush_recovered", rows=len(rows))
        self._failing = False
        self.flushes += 1

    async def purge(self) -> int:
        """Delete a batch of the minutes older than the retention; how many rows went."""
        before = datetime.fromtimestamp(self._clock(), UTC) - timedelta(
            days=self._settings.retention_days
        )
        try:
            return await self._store.purge_usage(
                before, batch_size=PURGE_BATCH_SIZE, timeout=PURGE_TIMEOUT_SECONDS
            )
        except StoreError:
            return 0

    async def _run(self) -> None:
        """A flush every flush interval; a purge every janitor interval, after its flush."""
        interval = self._settings.flush_interval_seconds
        purge_every = max(1, round(self._settings.janitor_interval_seconds / interval))
        rounds = 0

        async def flush_round() -> None:
            nonlocal rounds
            await self.flush()
            rounds += 1
            if rounds % purge_every == 0:
                await self.purge()

        await every("usage-flusher", flush_round, interval=interval, wait_first=True)
