"""A worker's memory budget: request bodies being read, upload replay copies and buffered answers.

Every byte the worker holds for a request is taken from the budget before it is kept, and given
back when the request ends (or the copy is dropped). One key may hold at most its share of the
budget. Past either, nothing is allocated: a request body is refused at once (503
`memory_busy`, or 429 `key_memory_share` for the key over its share; the connection closes, the
rest of the body unread), an upload's replay copy is dropped (that upload loses its failover,
not its answer), and a non-streamed answer waits for room up to the routing wait, then gets the
same refusal (503 `answer_memory_busy` for the worker). A lone request larger than the budget (or
its key's share) is still allowed when nothing else is held (by anyone, or by its key), so the
budget never refuses what `max_body_bytes` and `MAX_RESPONSE_BYTES` allow.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Literal

from gateway.dispatch.allocator import Trimmer
from gateway.shared.errors import GatewayError

# What the bytes are held for (the `use` label of the metrics).
Use = Literal["request_body", "upload_copy", "answer"]
USES: tuple[Use, ...] = ("request_body", "upload_copy", "answer")


class MemoryRefusedError(Exception):
    """No room: the worker's budget (`by_key` False) or the key's share (`by_key` True)."""

    def __init__(self, *, by_key: bool) -> None:
        super().__init__("the key's memory share is spent" if by_key else "the budget is spent")
        self.by_key = by_key


class MemoryBudget:
    """Bytes this worker holds for requests, at most `limit`, one key at most `share` of it."""

    def __init__(
        self,
        limit: int,
        share: float,
        wait_seconds: float,
        on_refusal: Callable[[Use, str], None] | None = None,
    ) -> None:
        self.limit = limit
        self._on_refusal = on_refusal
        self.key_limit = max(1, int(limit * share))
        self._wait_seconds = wait_seconds
        self._held = 0
        self._by_key: Counter[str] = Counter()
        self._by_use: Counter[Use] = Counter()
        self._freed = asyncio.Event()
        self.refusals: Counter[tuple[Use, str]] = Counter()
        self.trimmer = Trimmer()

    def publish(self, budget: Callable[[float], None], held: Callable[[Use, int], None]) -> None:
        """Report the budget and what is held for each use."""
        budget(self.limit)
        for use in USES:
            held(use, self._by_use[use])

    @property
    def held(self) -> int:
        """Bytes held right now."""
        return self._held

    def held_for(self, use: Use) -> int:
        """Bytes held right now for one use."""
        return self._by_use[use]

    def held_by(self, key_id: str) -> int:
        """Bytes one key holds right now."""
        return self._by_key[key_id]

    def reservation(self, key_id: str) -> Reservation:
        """A request's bytes, none until it takes some."""
        return Reservation(self, key_id)

    def _refusal(self, key_id: str, size: int, own: int) -> MemoryRefusedError | None:
        """Why `size` more bytes for a request holding `own` do not fit now, or None."""
        others = self._held - own
        if others > 0 and self._held + size > self.limit:
            return MemoryRefusedError(by_key=False)
        key_held = self._by_key[key_id]
        if key_held > own and key_held + size > self.key_limit:
            return MemoryRefusedError(by_key=True)
        return None

    def _try_take(self, key_id: str, use: Use, size: int, own: int) -> MemoryRefusedError | None:
        refusal = self._refusal(key_id, size, own)
        if refusal is not None:
            self._refused(use, refusal)
            return refusal
        self._held += size
        self._by_key[key_id] += size
        self._by_use[use] += size
        return None

    async def _take_waiting(self, key_id: str, use: Use, size: int, own: int) -> None:
        deadline = time.monotonic() + self._wait_seconds
        while (refusal := self._refusal(key_id, size, own)) is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._refused(use, refusal)
                raise refusal
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), remaining)
            except TimeoutError:
                continue
        self._held += size
        self._by_key[key_id] += size
        self._by_use[use] += size

    def _refused(self, use: Use, refusal: MemoryRefusedError) -> None:
        reason = "key_share" if refusal.by_key else "worker"
        self.refusals[use, reason] += 1
        if self._on_refusal is not None:
            self._on_refusal(use, reason)

    def _give_back(self, key_id: str, use: Use, size: int) -> None:
        self.trimmer.given_back(size)
        self._held -= size
        self._by_use[use] -= size
        self._by_key[key_id] -= size
        if self._by_key[key_id] <= 0:
            del self._by_key[key_id]
        self._freed.set()


class Reservation:
    """One request's bytes in the budget, by use; `release` gives them all back (idempotent)."""

    __slots__ = ("_budget", "_key_id", "_sizes")

    def __init__(self, budget: MemoryBudget, key_id: str) -> None:
        self._budget = budget
        self._key_id = key_id
        self._sizes: dict[Use, int] = {}

    @property
    def size(self) -> int:
        """Bytes this request holds."""
        return sum(self._sizes.values())

    def take_now(self, use: Use, size: int) -> None:
        """Hold `size` more bytes at once or raise the refusal as a GatewayError (a request
        body: 503 `memory_busy`, 429 `key_memory_share`), the connection closing after it."""
        refusal = self._budget._try_take(self._key_id, use, size, self.size)
        if refusal is not None:
            raise refused(refusal, "memory_busy", close=True)
        self._sizes[use] = self._sizes.get(use, 0) + size

    def try_take(self, use: Use, size: int) -> bool:
        """Hold `size` more bytes if they fit now; False (nothing held) when they do not."""
        if self._budget._try_take(self._key_id, use, size, self.size) is not None:
            return False
        self._sizes[use] = self._sizes.get(use, 0) + size
        return True

    async def take(self, size: int) -> None:
        """Hold `size` more bytes of an answer, waiting for room up to the routing wait; then
        503 `answer_memory_busy` (or 429 `key_memory_share`)."""
        try:
            await self._budget._take_waiting(self._key_id, "answer", size, self.size)
        except MemoryRefusedError as refusal:
            raise refused(refusal, "answer_memory_busy", close=False) from None
        self._sizes["answer"] = self._sizes.get("answer", 0) + size

    def release_use(self, use: Use) -> None:
        """Give back the bytes held for one use."""
        size = self._sizes.pop(use, 0)
        if size:
            self._budget._give_back(self._key_id, use, size)

    def release(self) -> None:
        """Give every byte back."""
        for use in list(self._sizes):
            self.release_use(use)


def refused(refusal: MemoryRefusedError, worker_code: str, *, close: bool) -> GatewayError:
    """The client's answer to a refusal: 429 for its key's share, else 503, both to retry."""
    headers = {"Connection": "close"} if close else None
    if refusal.by_key:
        return GatewayError(
            429,
            "This key holds its share of this gateway worker's memory for requests; "
            "try again shortly.",
            "key_memory_share",
            retry_after=1,
            headers=headers,
        )
    return GatewayError(
        503,
        "This gateway worker is holding too many large requests or answers; try again shortly.",
        worker_code,
        retry_after=1,
        headers=headers,
    )
