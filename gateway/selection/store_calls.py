"""Every call this process makes to the store: a free connection, an adaptive deadline, the breaker.

A burst of misses queues for a free connection here, in this process, and the store is not
blamed for that wait. The call itself runs under its operation's adaptive deadline (event-loop
lag not counted); its outcome feeds the breaker, the latency histogram and `store_up`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import structlog

from affinity_store.store import AffinityStore, StoreError, StoreTimeout
from gateway.config_service import AffinitySettings
from gateway.selection.breaker import Breaker, BreakerState
from gateway.selection.deadlines import AdaptiveDeadline, await_within
from gateway.shared.metrics import Metrics

logger = structlog.get_logger("gateway.selection.affinity")

JANITOR_TIMEOUT_SECONDS = 10.0
# Look-ups made at start-up to measure the store's pace before the first deadline applies.
START_PROBES = 3

T = TypeVar("T")

Operation = Literal["lookup", "claim", "renew", "rebind", "purge"]


class StoreBusy(StoreError):  # noqa: N818  (named like the store's own errors)
    """Every store connection of this process stayed in use for a call's whole limit."""


class StoreCalls:
    """Store calls, at most `connections` at once, each under its operation's deadline."""

    def __init__(
        self,
        store: AffinityStore,
        settings: AffinitySettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        connections: int | None,
    ) -> None:
        """`connections` is the store's pool size (None: no limit here); `clock` times the
        breaker's cool-off."""
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._slots = None if connections is None else asyncio.Semaphore(connections)
        self.breaker = Breaker(settings.breaker_cooloff_seconds, clock)
        lookup, claim = settings.lookup_timeout_ms / 1000, settings.claim_timeout_ms / 1000
        self._deadlines: dict[Operation, AdaptiveDeadline] = {
            "lookup": AdaptiveDeadline(lookup),
            "claim": AdaptiveDeadline(claim),
            "renew": AdaptiveDeadline(claim),
            "rebind": AdaptiveDeadline(claim),
            "purge": AdaptiveDeadline(JANITOR_TIMEOUT_SECONDS),
        }

    async def probe(self) -> None:
        """A few look-ups before serving, so the first deadlines fit the store's pace now (a
        cold fleet starting on a busy host); they prove nothing to the breaker either way."""
        deadline = self._deadlines["lookup"]
        for _ in range(START_PROBES):
            started = time.perf_counter()
            try:
                await self._store.lookup("", "", timeout=deadline.limit)
            except StoreError:
                return
            deadline.observe(time.perf_counter() - started)

    async def call(self, operation: Operation, call: Callable[[float], Awaitable[T]]) -> T:
        """One store call: first a free connection (waiting at most the call's limit, else
        StoreBusy), then the call under its deadline. `call` gets the hard limit the store
        enforces; a StoreError from it is raised on."""
        deadline = self._deadlines[operation]
        if self._slots is None:
            return await self._timed(operation, deadline, call)
        try:
            async with asyncio.timeout(deadline.limit):
                await self._slots.acquire()
        except TimeoutError:
            self.breaker.abandoned()
            self._observe(operation, self.breaker.state(), time.perf_counter(), "StoreBusy")
            raise StoreBusy(f"no free store connection within {deadline.limit:.3f} s") from None
        try:
            return await self._timed(operation, deadline, call)
        finally:
            self._slots.release()

    async def _timed(
        self,
        operation: Operation,
        deadline: AdaptiveDeadline,
        call: Callable[[float], Awaitable[T]],
    ) -> T:
        """One store call under its adaptive deadline (event-loop lag not counted): time it,
        and feed its outcome to the breaker. `call` gets the hard limit the store enforces."""
        state = self.breaker.state()
        began = self._clock()
        started = time.perf_counter()
        budget = deadline.budget()
        try:
            try:
                result = await await_within(
                    call(deadline.limit), budget=budget, limit=deadline.limit
                )
            except TimeoutError as error:
                raise StoreTimeout(f"store call exceeded its {budget:.3f} s deadline") from error
        except StoreError as error:
            self._observe(operation, state, started, type(error).__name__)
            self.breaker.failed(began)
            if state != "open" and self.breaker.state() == "open":
                logger.warning(
                    "affinity_store_down",
                    operation=operation,
                    error=type(error).__name__,
                    detail=str(error),
                    cooloff_seconds=self._settings.breaker_cooloff_seconds,
                )
                self._metrics.store_up.set(0)
            raise
        except BaseException:
            self.breaker.abandoned()
            raise
        self._observe(operation, state, started, "ok")
        deadline.observe(time.perf_counter() - started)
        if state == "half_open":
            logger.info("affinity_store_recovered", operation=operation)
        self.breaker.succeeded()
        self._metrics.store_up.set(1)
        return result

    def _observe(
        self, operation: Operation, state: BreakerState, started: float, outcome: str
    ) -> None:
        """Record the call's time since `started` by operation, breaker state and outcome."""
        self._metrics.store_latency.labels(operation, state, outcome).observe(
            time.perf_counter() - started
        )
