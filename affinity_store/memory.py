"""The in-memory store's database: its clock, an injectable outage, and per-call deadlines.

Every part of `MemoryAffinityStore` (bindings, stored responses, workers and their shares)
works on a `MemoryDatabase`: "database" time from an injectable clock, and a boundary around
each call that raises an injected failure and turns an exceeded deadline into `StoreTimeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from affinity_store.store import StoreError, StoreTimeout


def utc_now() -> datetime:
    """Return the current time, tz-aware in UTC."""
    return datetime.now(UTC)


class MemoryDatabase:
    """One process's stand-in for the database: a clock and an outage switch."""

    def __init__(self, *, clock: Callable[[], datetime] = utc_now) -> None:
        """`clock` returns tz-aware "database" time (defaults to UTC now)."""
        self._clock = clock
        self._failure: StoreError | None = None

    def fail_with(self, error: StoreError | None) -> None:
        """Make every later call raise `error` (simulating an outage) until given None."""
        self._failure = error

    @contextlib.asynccontextmanager
    async def _boundary(self, seconds: float) -> AsyncIterator[None]:
        """Raise the injected failure, and turn an exceeded deadline into StoreTimeout."""
        if self._failure is not None:
            raise self._failure
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError as error:
            raise StoreTimeout(f"store call exceeded its {seconds:.3f} s deadline") from error
