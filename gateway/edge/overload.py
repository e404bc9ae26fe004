"""Load shedding: past its capacity a worker answers new requests a prompt 503, not a queue.

The scarce resource of a worker is its one event loop. Requests in flight are not: thousands of
streams that wait on upstream tokens cost almost nothing, and one of them may rightly last
minutes, so neither an in-flight cap nor a request-latency limit tells an idle crowd from an
overload. What does is how late the loop runs a timer (its *lag*): a probe sleeps
`PROBE_SECONDS` again and again and reports how much later than asked it woke. Work that waits in
the loop's ready queue, or in socket buffers the loop has not read yet, delays the probe too.

As in CoDel, a burst is not an overload: only when the *smallest* lag seen over a whole
`interval` (and at least `MIN_SAMPLES` probes) stays above `target_lag` is the worker
overloaded. Then each new request is refused
with probability `probability`, which grows each interval the overload persists (faster the
further the lag is over the target) and shrinks each interval it does not, until it is 0 again.
Requests already admitted are never cut. A key with fewer requests in flight on this worker than
the mean of the keys that have some is refused with probability `probability²` instead, so a
key that floods takes more of the refusals than one that does not.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from gateway.background import stop_task

logger = structlog.get_logger("gateway.edge.overload")

# How often the probe measures the loop's lag: cheap (a timer wake-up), and at least ten
# samples per interval.
PROBE_SECONDS = 0.005
# Each overloaded interval adds this much refusal probability per target's worth of lag
# (at most `MAX_STEP_TARGETS` targets' worth), each calm one takes `EASE` away: fast up, so a
# queue stops growing within a few intervals; slower down, so shedding does not flap.
STEP = 0.05
MAX_STEP_TARGETS = 4.0
EASE = 0.02
# Below half the target the queue is empty and the probability falls faster.
CALM_EASE = 0.1
# An interval is judged on at least this many samples: one long pause (a collection, a slow
# synchronous call) is a single late sample, not a queue that stays.
MIN_SAMPLES = 2
# Seconds a shed request is told to wait.
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class SheddingPolicy:
    """When a worker counts as overloaded (see the module's description)."""

    target_lag: float  # seconds
    interval: float  # seconds


class LoadShedder:
    """The overload controller of one worker: fed lag samples, it decides each admission."""

    def __init__(
        self,
        policy: SheddingPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        chance: Callable[[], float] = random.random,
        on_shed: Callable[[], None] | None = None,
    ) -> None:
        self.policy = policy
        self.probability = 0.0
        self.lag = 0.0  # the smallest lag of the last whole interval, seconds
        self.shed = 0  # requests refused so far
        self.episodes = 0  # times shedding started
        self._clock = clock
        self._chance = chance
        self._on_shed = on_shed
        self._window_started = clock()
        self._window_lag = math.inf
        self._window_samples = 0
        self._episode_shed = 0

    @property
    def overloaded(self) -> bool:
        """Whether new requests are being refused (with some probability) now."""
        return self.probability > 0.0

    def observe(self, lag: float) -> None:
        """Take one probe's lag (seconds); at the end of each interval, adapt the probability."""
        self._window_lag = min(self._window_lag, lag)
        self._window_samples += 1
        now = self._clock()
        if now - self._window_started < self.policy.interval or self._window_samples < MIN_SAMPLES:
            return
        self._adapt(self._window_lag)
        self._window_started = now
        self._window_lag = math.inf
        self._window_samples = 0

    def admits(self, *, light: bool) -> bool:
        """Whether to admit a new request; `light`: its key has fewer requests in flight than
        the mean of the keys with some. A refusal is counted."""
        probability = self.probability
        if probability <= 0.0:
            return True
        if light:
            probability *= probability
        if self._chance() >= probability:
            return True
        self.shed += 1
        self._episode_shed += 1
        if self._on_shed is not None:
            self._on_shed()
        return False

    def _adapt(self, lag: float) -> None:
        self.lag = lag
        target = self.policy.target_lag
        before = self.probability
        if lag > target:
            step = STEP * min(MAX_STEP_TARGETS, lag / target)
            self.probability = min(1.0, before + step)
        else:
            ease = CALM_EASE if lag < target / 2 else EASE
            self.probability = max(0.0, before - ease)
        if before == 0.0 and self.probability > 0.0:
            self.episodes += 1
            self._episode_shed = 0
            logger.warning("load_shedding_started", lag_ms=round(lag * 1000, 1))
        elif before > 0.0 and self.probability == 0.0:
            logger.info("load_shedding_stopped", shed=self._episode_shed)


class LagProbe:
    """The owned background task that measures the loop's lag for a `LoadShedder`."""

    def __init__(self, shedder: LoadShedder, *, report: Callable[[float], None]) -> None:
        self._shedder = shedder
        self._report = report
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start probing."""
        self._task = asyncio.create_task(self._run(), name="loop-lag-probe")

    async def stop(self) -> None:
        """Stop probing."""
        await stop_task(self._task)
        self._task = None

    async def _run(self) -> None:
        clock = time.perf_counter
        published = clock()
        while True:
            asked = clock()
            await asyncio.sleep(PROBE_SECONDS)
            woke = clock()
            self._shedder.observe(max(0.0, woke - asked - PROBE_SECONDS))
            if woke - published >= self._shedder.policy.interval:
                published = woke
                self._report(self._shedder.lag)
