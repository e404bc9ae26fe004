"""Deadlines that measure what is awaited, not this process's own event-loop lag.

A worker whose event loop is busy (a burst of requests at start-up, a CPU-starved host) notices
an answer late. A plain `asyncio.timeout` blames the database for that delay and, three times in
a row, opens the store's breaker although the database answered in time. Here the wait is cut
into short slices; whatever a slice overran its own timer by is time the loop could not run
anything, and it is not charged to the budget.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        while True:
            step = min(SLICE_SECONDS, budget - charged, limit - (loop.time() - started))
            if step <= 0:
                raise TimeoutError
            before = loop.time()
            done, _ = await asyncio.wait({task}, timeout=step)
            if done:
                return task.result()
            charged += min(loop.time() - before, step)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
