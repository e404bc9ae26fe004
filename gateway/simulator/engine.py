"""The simulated inference engine: bounded running sequences, a FIFO queue, caching, timing."""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from collections import deque

from gateway.simulator.options import Timing
from gateway.simulator.prefix_cache import Block, PrefixCache
from gateway.simulator.prompts import Prompt


class Sequence:
    """One admitted request: its prompt accounting and when each output token is due."""

    __slots__ = (
        "_engine",
        "_finished",
        "_started_at",
        "cached_tokens",
        "output_tokens",
        "produced_tokens",
        "prompt_tokens",
        "token_interval_seconds",
        "ttft_seconds",
    )

    def __init__(
        self,
        engine: Engine,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        output_tokens: int,
        ttft_seconds: float,
        token_interval_seconds: float,
    ) -> None:
        """Start the sequence's clock now."""
        self._engine = engine
        self._finished = False
        self._started_at = time.monotonic()
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.output_tokens = output_tokens
        self.produced_tokens = 0
        self.ttft_seconds = ttft_seconds
        self.token_interval_seconds = token_interval_seconds

    def due_at(self, index: int) -> float:
        """The `time.monotonic()` reading at which output token `index` (0-based) is due."""
        return self._started_at + self.ttft_seconds + index * self.token_interval_seconds

    def seconds_until_token(self, index: int) -> float:
        """Seconds until output token `index` is due; zero or less means it is ready."""
        offset = self.ttft_seconds + index * self.token_interval_seconds
        if offset <= 0.0:
            return 0.0
        return self._started_at + offset - time.monotonic()

    async def wait_for_token(self, index: int) -> None:
        """Sleep until output token `index` is due; returns at once when it already is."""
        remaining = self.seconds_until_token(index)
        if remaining > 0.0:
            await asyncio.sleep(remaining)

    def finish(self, finish_reason: str) -> None:
        """Free the sequence's slot and count its produced tokens; later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        self._engine.release(self.produced_tokens, finish_reason, self.prompt_tokens)


TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
"""vLLM's bucket bounds for `vllm:time_to_first_token_seconds`."""


class TtftHistogram:
    """Time from a request's arrival to its first token, as vLLM's histogram counts it."""

    def __init__(self) -> None:
        """Start empty."""
        self.bucket_counts = [0] * (len(TTFT_BUCKETS) + 1)  # the last one is +Inf
        self.total_seconds = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        """Count one first token that came `seconds` after its request arrived."""
        self.bucket_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.total_seconds += seconds
        self.count += 1


class Engine:
    """Admits at most `max_num_seqs` sequences at once; the rest wait in arrival order."""

    def __init__(self, timing: Timing, cache: PrefixCache) -> None:
        """Start idle, with the given latency model and prefix cache."""
        self.timing = timing
        self.cache = cache
        self.running = 0
        self.held_tokens = 0
        """Prompt tokens of the admitted sequences: the KV cache they hold (vLLM's usage)."""
        self.peak_running = 0
        self.peak_waiting = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefix_cache_queries_total = 0
        self.prefix_cache_hits_total = 0
        self.finished_total: dict[str, int] = {}
        self.ttft = TtftHistogram()
        self._random = random.Random()
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._resumed = asyncio.Event()
        self._resumed.set()

    @property
    def waiting(self) -> int:
        """Sequences queued for a slot."""
        return len(self._waiters)

    @property
    def paused(self) -> bool:
        """Whether admitted sequences are held before their first token."""
        return not self._resumed.is_set()

    def pause(self) -> None:
        """Hold every admitted sequence before its first token until `resume`."""
        self._resumed.clear()

    def resume(self) -> None:
        """Let held sequences continue."""
        self._resumed.set()

    def reset_peaks(self) -> None:
        """Restart the peak counters from the current load."""
        self.peak_running = self.running
        self.peak_waiting = self.waiting

    async def start(self, prompt: Prompt, output_tokens: int, slow: float) -> Sequence:
        """Wait for a slot, look the prompt up in the prefix cache, and return the sequence."""
        arrived_at = time.monotonic()
        await self._admit()
        try:
            if not self._resumed.is_set():
                await self._resumed.wait()
        except BaseException:
            self.release(0, "abort")
            raise
        cached_tokens = 0
        for chain in prompt.chains:
            cached_tokens += self.cache.match_and_insert(chain)
        self.prompt_tokens_total += prompt.tokens
        self.held_tokens += prompt.tokens
        self.prefix_cache_queries_total += prompt.tokens
        self.prefix_cache_hits_total += cached_tokens
        timing = self.timing
        uncached_tokens = prompt.tokens - cached_tokens
        ttft_ms = timing.base_ttft_ms + timing.per_token_ms * uncached_tokens
        if timing.ttft_jitter_ms:
            ttft_ms += self._random.uniform(0.0, timing.ttft_jitter_ms)
        ttft_seconds = ttft_ms * slow / 1000.0
        # Observed when the first token's time is fixed, as arrival to first token: queueing
        # for a slot included, like vLLM's own figure.
        self.ttft.observe(time.monotonic() - arrived_at + ttft_seconds)
        interval_seconds = slow / timing.tokens_per_second if timing.tokens_per_second > 0 else 0.0
        return Sequence(
            self,
            prompt_tokens=prompt.tokens,
            cached_tokens=cached_tokens,
            output_tokens=output_tokens,
            ttft_seconds=ttft_seconds,
            token_interval_seconds=interval_seconds,
        )

    def remember(self, chain: tuple[Block, ...]) -> None:
        """Cache `chain` without counting a query, as vLLM caches a finished sequence's output."""
        self.cache.match_and_insert(chain)

    def release(self, produced_tokens: int, finish_reason: str, prompt_tokens: int = 0) -> None:
        """Count a finished sequence, free the cache its prompt held, and hand its slot to the
        oldest waiter, if any."""
        self.generation_tokens_total += produced_tokens
        self.held_tokens -= prompt_tokens
        self.finished_total[finish_reason] = self.finished_total.get(finish_reason, 0) + 1
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                # The slot passes straight to the waiter, so `running` does not change.
                waiter.set_result(None)
                return
        self.running -= 1

    async def _admit(self) -> None:
        if self.running < self.timing.max_num_seqs and not self._waiters:
            self.running += 1
            self.peak_running = max(self.peak_running, self.running)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.peak_waiting = max(self.peak_waiting, len(self._waiters))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just before the cancellation: pass it on.
                self.release(0, "abort")
            else:
                self._waiters.remove(waiter)
            raise
