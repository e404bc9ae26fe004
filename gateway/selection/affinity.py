"""The gateway's side of shared affinity: local cache, single-flight, breaker, renewals, janitor."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog

from affinity_store.store import (
    AffinityStore,
    Binding,
    Candidate,
    Renewal,
    Spread,
    StoreError,
    StoreTimeout,
)
from gateway.config_service import AffinitySettings
from gateway.selection.binding_cache import BindingCache
from gateway.selection.breaker import Breaker, BreakerState
from gateway.selection.deadlines import AdaptiveDeadline, await_within
from gateway.shared.background import every, stop_task
from gateway.shared.metrics import Metrics

logger = structlog.get_logger("gateway.selection.affinity")

LOCAL_CACHE_CAPACITY = 250_000
# One key's share of the local copies: an application key with a binding per conversation
# cannot push every other key's copies out (a fifth of them always stays for the others).
LOCAL_CACHE_PER_KEY = 200_000
JANITOR_BATCH_SIZE = 1000
JANITOR_TIMEOUT_SECONDS = 10.0
RENEW_BATCH_SIZE = 500
RENEW_LINGER_SECONDS = 1.0
# A claim keeps the agreed provider while it holds at most this many more bindings than the
# least-bound candidate (or `agreement_slack` of that count, whichever is larger).
AGREEMENT_MIN_BINDINGS = 2
# Look-ups made at start-up to measure the store's pace before the first deadline applies.
START_PROBES = 3

T = TypeVar("T")


@dataclass(slots=True)
class CachedBinding:
    """A binding as this process last saw it, with its expiry on this process's clock."""

    provider: str
    routing_identity: str
    cached_at: float
    expires_at: float
    renewal_queued: bool = False
    generation: int | None = None  # the change feed's generation it is covered by, if any


class ChangeFeed(Protocol):
    """Notifications of binding changes from every process (see affinity_store.notifications)."""

    @property
    def verified(self) -> bool:
        """Whether every change is being heard right now."""
        ...

    @property
    def generation(self) -> int:
        """Moves on whenever `verified` changes."""
        ...

    @property
    def changes_heard(self) -> int:
        """How many changes have been heard so far."""
        ...


class StoreBusy(StoreError):  # noqa: N818  (named like the store's own errors)
    """Every store connection of this process stayed in use for a call's whole limit."""


@dataclass(frozen=True)
class Lookup:
    """The outcome of asking for a binding: the binding, or none, or the store was skipped."""

    binding: CachedBinding | None
    degraded: bool = False


@dataclass(frozen=True)
class _Renewal:
    api_key_id: str
    model: str
    provider: str


@dataclass(frozen=True)
class _Rebind:
    api_key_id: str
    model: str
    old_provider: str
    new: Candidate


class SharedAffinity:
    """Bindings shared through the store, never on the critical path when the store is sick."""

    def __init__(
        self,
        store: AffinityStore,
        settings: AffinitySettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        connections: int | None = None,
    ) -> None:
        """`connections` is the store's pool size: at most that many calls are made at once."""
        self.store = store
        self._sleep = sleep
        self._slots = None if connections is None else asyncio.Semaphore(connections)
        self.breaker = Breaker(settings.breaker_cooloff_seconds, clock)
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._cache: BindingCache[CachedBinding] = BindingCache(
            LOCAL_CACHE_CAPACITY, LOCAL_CACHE_PER_KEY
        )
        self._lookups: dict[tuple[str, str], asyncio.Future[Lookup | None]] = {}
        self._claims: dict[tuple[str, str], asyncio.Future[Lookup | None]] = {}
        self._queue: asyncio.Queue[_Renewal | _Rebind] = asyncio.Queue(settings.renew_queue_size)
        self._tasks: list[asyncio.Task[None]] = []
        self._feed: ChangeFeed | None = None
        self._spread = Spread(share=settings.agreement_slack, minimum=AGREEMENT_MIN_BINDINGS)
        lookup, claim = settings.lookup_timeout_ms / 1000, settings.claim_timeout_ms / 1000
        self._deadlines = {
            "lookup": AdaptiveDeadline(lookup),
            "claim": AdaptiveDeadline(claim),
            "renew": AdaptiveDeadline(claim),
            "rebind": AdaptiveDeadline(claim),
            "purge": AdaptiveDeadline(JANITOR_TIMEOUT_SECONDS),
        }
        self._metrics.store_up.set(1)

    def follow(self, feed: ChangeFeed) -> None:
        """Trust local copies for as long as `feed` hears every change (it calls `changed`)."""
        self._feed = feed

    def changed(self, api_key_id: str, model: str) -> None:
        """Some process changed this binding: forget the local copy."""
        self._cache.pop((api_key_id, model))

    def publish_gauges(self) -> None:
        """Mirror whether copies of bindings are covered by the change feed into its gauge."""
        self._metrics.change_feed_verified.set(0 if self._vouching_generation() is None else 1)

    def _vouching_generation(self) -> int | None:
        """The change feed's generation while it vouches for local copies, else None."""
        feed = self._feed
        if feed is None or not feed.verified or self._settings.local_cache_seconds <= 0:
            return None  # local_cache_seconds 0: always ask the store
        return feed.generation

    def _changes_heard(self) -> int:
        return -1 if self._feed is None else self._feed.changes_heard

    def _covered(self, entry: CachedBinding) -> bool:
        """Whether every change since `entry` was read has been heard (so it is still right)."""
        return entry.generation is not None and entry.generation == self._vouching_generation()

    async def start(self) -> None:
        """Measure the store's pace, then start the renewal worker and the janitor."""
        await self._probe()
        self._tasks = [
            asyncio.create_task(self._renew_worker(), name="affinity-renewals"),
            asyncio.create_task(self._janitor(), name="affinity-janitor"),
        ]

    async def _probe(self) -> None:
        """A few look-ups before serving, so the first deadlines fit the store's pace now (a
        cold fleet starting on a busy host); they prove nothing to the breaker either way."""
        deadline = self._deadlines["lookup"]
        for _ in range(START_PROBES):
            started = time.perf_counter()
            try:
                await self.store.lookup("", "", timeout=deadline.limit)
            except StoreError:
                return
            deadline.observe(time.perf_counter() - started)

    async def stop(self) -> None:
        """Cancel the background tasks and wait for them."""
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []

    def cached(self, api_key_id: str, model: str, *, fresh: bool = True) -> CachedBinding | None:
        """The local copy of a binding (no I/O).

        A copy covered by the change feed is right until a change is heard, whatever its age
        (renewals keep it alive in the store). Otherwise it must be live, and with `fresh` also
        younger than `local_cache_seconds`.
        """
        key = (api_key_id, model)
        entry = self._cache.get(key)
        if entry is None:
            return None
        if self._covered(entry):
            return entry
        now = self._clock()
        if now >= entry.expires_at:
            self._cache.pop(key)
            return None
        if fresh and now - entry.cached_at > self._settings.local_cache_seconds:
            return None
        return entry

    async def lookup(self, api_key_id: str, model: str) -> Lookup:
        """The live binding: from the local cache, else one lock-free read under its deadline.

        Concurrent look-ups of one (key, model) in this process share one read. When the store
        cannot be asked, the result is degraded and carries the last binding this process saw,
        if it has not expired: local state is still the best guess.
        """
        entry = self.cached(api_key_id, model)
        if entry is not None:
            return Lookup(entry)
        return await self._collapsed(
            self._lookups, (api_key_id, model), lambda: self._lookup(api_key_id, model)
        )

    async def _lookup(self, api_key_id: str, model: str) -> Lookup:
        if not self.breaker.allow():
            return Lookup(self.cached(api_key_id, model, fresh=False), degraded=True)
        heard = self._changes_heard()
        try:
            binding = await self._call(
                "lookup",
                lambda limit: self.store.lookup(api_key_id, model, timeout=limit),
            )
        except StoreError:
            return Lookup(self.cached(api_key_id, model, fresh=False), degraded=True)
        if binding is None:
            self._cache.pop((api_key_id, model))
            return Lookup(None)
        return Lookup(self._remember(binding, heard))

    async def claim(
        self,
        api_key_id: str,
        model: str,
        *,
        preferred: Sequence[Candidate],
        acceptable: Collection[str],
        weights: Mapping[str, float] | None = None,
        group: str | None = None,
    ) -> Lookup:
        """Bind on a miss; concurrent misses for one (key, model) here share one claim.

        `weights` (capacity per routing identity) and `group` shape the claim's spread (see
        `Spread`)."""
        spread = self._spread
        if weights or group is not None:
            spread = dataclasses.replace(spread, weights=weights or {}, group=group)
        return await self._collapsed(
            self._claims,
            (api_key_id, model),
            lambda: self._claim(api_key_id, model, preferred, acceptable, spread),
        )

    @staticmethod
    async def _collapsed(
        pending: dict[tuple[str, str], asyncio.Future[Lookup | None]],
        key: tuple[str, str],
        call: Callable[[], Awaitable[Lookup]],
    ) -> Lookup:
        """Single flight: the first caller makes the call, the others await its result.

        If the first caller is cancelled (its client left), the others do not inherit that:
        they are told to try again, and one of them makes the call.
        """
        while (shared := pending.get(key)) is not None:
            result = await asyncio.shield(shared)
            if result is not None:
                return result
        future: asyncio.Future[Lookup | None] = asyncio.get_running_loop().create_future()
        pending[key] = future
        try:
            result = await call()
        except BaseException:
            future.set_result(None)
            raise
        finally:
            if pending.get(key) is future:
                del pending[key]
        future.set_result(result)
        return result

    async def _claim(
        self,
        api_key_id: str,
        model: str,
        preferred: Sequence[Candidate],
        acceptable: Collection[str],
        spread: Spread,
    ) -> Lookup:
        if not self.breaker.allow():
            return Lookup(None, degraded=True)
        heard = self._changes_heard()
        try:
            binding = await self._call(
                "claim",
                lambda limit: self.store.claim(
                    api_key_id,
                    model,
                    acceptable=acceptable,
                    preferred=preferred,
                    ttl_seconds=self._settings.ttl_seconds,
                    timeout=limit,
                    spread=spread,
                ),
            )
        except StoreError:
            return Lookup(None, degraded=True)
        return Lookup(self._remember(binding, heard))

    def served(
        self,
        api_key_id: str,
        model: str,
        *,
        bound: CachedBinding | None,
        served: Candidate,
    ) -> bool:
        """Queue the renewal or rebind a success calls for; True when it was a rebind."""
        if bound is None:
            return False
        if served.provider == bound.provider:
            remaining = bound.expires_at - self._clock()
            if remaining < self._settings.ttl_seconds / 2 and not bound.renewal_queued:
                bound.renewal_queued = self._enqueue(_Renewal(api_key_id, model, served.provider))
            return False
        # Until the rebind lands, this process already follows the provider that served.
        now = self._clock()
        self._cache.put(
            (api_key_id, model),
            CachedBinding(
                served.provider, served.routing_identity, now, now + self._settings.ttl_seconds
            ),
        )
        self._enqueue(_Rebind(api_key_id, model, bound.provider, served))
        return True

    def _remember(self, binding: Binding, heard: int) -> CachedBinding:
        """Cache a binding read when `heard` changes had been heard; a change heard while it
        was being read may be newer than it, so then it is not covered by the feed."""
        now = self._clock()
        entry = CachedBinding(
            binding.provider,
            binding.routing_identity,
            now,
            now + binding.ttl_remaining,
            generation=self._vouching_generation() if heard == self._changes_heard() else None,
        )
        key = (binding.api_key_id, binding.model)
        self._cache.put(key, entry)
        return entry

    def _enqueue(self, item: _Renewal | _Rebind) -> bool:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._metrics.renew_drops.labels("queue_full").inc()
            return False
        self._metrics.renew_queue_depth.set(self._queue.qsize())
        return True

    async def _call(self, operation: str, call: Callable[[float], Awaitable[T]]) -> T:
        """One store call: first a free connection (waiting at most the call's limit: a burst
        of misses queues here, in this process, and the store is not blamed for it), then the
        call under its deadline."""
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
        self, operation: str, deadline: AdaptiveDeadline, call: Callable[[float], Awaitable[T]]
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

    def _observe(self, operation: str, state: BreakerState, started: float, outcome: str) -> None:
        self._metrics.store_latency.labels(operation, state, outcome).observe(
            time.perf_counter() - started
        )

    async def _renew_worker(self) -> None:
        while True:
            batch = [await self._queue.get()]
            # Renewals are due with half a TTL to spare: gather them for a moment, so a busy
            # worker sends at most one renewal statement per RENEW_LINGER_SECONDS.
            await self._sleep(RENEW_LINGER_SECONDS)
            while len(batch) < RENEW_BATCH_SIZE and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._metrics.renew_queue_depth.set(self._queue.qsize())
            if not self.breaker.allow():
                self._metrics.renew_drops.labels("store_down").inc(len(batch))
                continue
            with contextlib.suppress(StoreError):
                await self._renew([item for item in batch if isinstance(item, _Renewal)])
            for item in batch:
                if isinstance(item, _Rebind):
                    with contextlib.suppress(StoreError):
                        await self._rebind(item)

    async def _renew(self, renewals: list[_Renewal]) -> None:
        """Renew a batch in one statement; forget local copies whose binding is gone."""
        if not renewals:
            return
        ttl = self._settings.ttl_seconds
        renewed = await self._call(
            "renew",
            lambda limit: self.store.renew_many(
                [Renewal(item.api_key_id, item.model, item.provider) for item in renewals],
                ttl_seconds=ttl,
                timeout=limit,
            ),
        )
        now = self._clock()
        for item in renewals:
            key = (item.api_key_id, item.model)
            entry = self._cache.get(key)
            if entry is None or entry.provider != item.provider:
                continue
            if key in renewed:
                entry.expires_at = now + ttl
                entry.renewal_queued = False
            else:  # purged, or moved by another process: read it again next time
                self._cache.pop(key)

    async def _rebind(self, item: _Rebind) -> None:
        await self._call(
            "rebind",
            lambda limit: self.store.rebind(
                item.api_key_id,
                item.model,
                old_provider=item.old_provider,
                new=item.new,
                ttl_seconds=self._settings.ttl_seconds,
                timeout=limit,
            ),
        )

    async def _janitor(self) -> None:
        """A purge of long-expired bindings every janitor interval."""
        await every(
            "affinity-janitor",
            self._purge_expired,
            interval=self._settings.janitor_interval_seconds,
            wait_first=True,
        )

    async def _purge_expired(self) -> None:
        """One janitor round (none while the store's breaker is open)."""
        if self.breaker.allow():
            with contextlib.suppress(StoreError):
                deleted = await self._call(
                    "purge",
                    lambda limit: self.store.purge_expired(
                        grace_seconds=self._settings.janitor_grace_seconds,
                        batch_size=JANITOR_BATCH_SIZE,
                        timeout=limit,
                    ),
                )
                if deleted:
                    logger.info("janitor_purged", rows=deleted)
