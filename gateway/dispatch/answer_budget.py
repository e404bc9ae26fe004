"""A worker's memory budget for non-streamed answers, which are held whole before they are sent.

Each request's buffered bytes are taken from the budget as they arrive and given back once the
answer is sent (or abandoned). A request that would go over waits for room, up to the routing
wait, then gets 503; a lone answer larger than the whole budget is still allowed when nothing
else is held, so the budget never refuses what `MAX_RESPONSE_BYTES` allows.
"""

from __future__ import annotations

import asyncio
import time

from gateway.edge.errors import GatewayError


class AnswerBudget:
    """Bytes of non-streamed answers this worker holds at once, at most `limit`."""

    def __init__(self, limit: int, wait_seconds: float) -> None:
        self._limit = limit
        self._wait_seconds = wait_seconds
        self._held = 0
        self._freed = asyncio.Event()

    @property
    def held(self) -> int:
        """Bytes held right now."""
        return self._held

    def reservation(self) -> Reservation:
        """A request's share, empty until it takes bytes."""
        return Reservation(self)

    async def _take(self, size: int, own: int) -> None:
        deadline = time.monotonic() + self._wait_seconds
        while self._held > own and self._held + size > self._limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GatewayError(
                    503,
                    "This gateway worker is holding too many large answers; try again shortly.",
                    "answer_memory_busy",
                    retry_after=1,
                )
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), remaining)
            except TimeoutError:
                continue
        self._held += size

    def _give_back(self, size: int) -> None:
        self._held -= size
        self._freed.set()


class Reservation:
    """One request's bytes in the budget; `release` gives them all back (idempotent)."""

    __slots__ = ("_budget", "_size")

    def __init__(self, budget: AnswerBudget) -> None:
        self._budget = budget
        self._size = 0

    async def take(self, size: int) -> None:
        """Hold `size` more bytes, waiting for room; 503 GatewayError when there is none."""
        await self._budget._take(size, self._size)
        self._size += size

    def release(self) -> None:
        """Give every byte back."""
        if self._size:
            self._budget._give_back(self._size)
            self._size = 0
