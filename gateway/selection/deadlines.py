"""Deadlines that measure what is awaited, not this process's own event-loop lag.

A worker whose event loop is busy (a burst of requests at start-up, a CPU-starved host) notices
an answer late. A plain `asyncio.timeout` blames the database for that delay and, three times in
a row, opens the store's breaker although the database answered in time. Here the wait is cut
into short slices. A slice that overran its own timer shows this process could not run on time:
the overrun is not charged to the budget, and neither is the slice itself in proportion (a
slice late by its own length or more charges nothing), since a host too busy to run this worker
on time is usually too busy to run the database on time as well. A starved host therefore
stretches the deadline up to its limit; an idle one charges nearly every millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

SLICE_SECONDS = 0.005


async def await_within(awaitable: Awaitable[T], *, budget: float, limit: float) -> T:
    """Await `awaitable` for at most `budget` seconds of its own time and `limit` in all.

    Raises TimeoutError (after cancelling it) when either runs out; time this event loop was
    too busy to run its timers is not charged to `budget`.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(awaitable)
    started = loop.time()
    charged = 0.0
    try:
        while charged < budget:
            step = min(SLICE_SECONDS, limit - (loop.time() - started))
            if step <= 0:
                break
            before = loop.time()
            done, _ = await asyncio.wait({task}, timeout=step)
            if done:
                return task.result()
            overrun = loop.time() - before - step
            charged += max(0.0, step - max(0.0, overrun))
        raise TimeoutError
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class AdaptiveDeadline:
    """A kind of store call's deadline: the configured one, stretched to a multiple of the
    slowest of the recent successful calls, never beyond `limit_factor` times the configured one
    (or `limit_floor`, whichever is longer).

    Like TCP's retransmission timeout, it follows the store's own recent pace: a database whose
    calls take up to 40 ms while a cold fleet starts keeps an 80 ms deadline, and the configured
    one returns once the last `window` calls were fast again.
    """

    def __init__(
        self,
        configured: float,
        *,
        limit_factor: float = 10,
        limit_floor: float = 1.0,
        multiple: float = 2,
        window: int = 32,
    ) -> None:
        self.configured = configured
        # A host too busy to answer a 50 ms look-up in 500 ms is busy everywhere: allow a second.
        self.limit = max(configured * limit_factor, limit_floor)
        self._multiple = multiple
        self._recent: deque[float] = deque(maxlen=window)

    def budget(self) -> float:
        """The deadline for the next call."""
        if not self._recent:
            return self.configured
        return min(self.limit, max(self.configured, self._multiple * max(self._recent)))

    def observe(self, seconds: float) -> None:
        """A call succeeded in `seconds`."""
        self._recent.append(seconds)
