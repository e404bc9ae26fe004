"""Per-process concurrency permits: provider limits with FIFO waiting, pacing, and key limits."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.catalog import Key, Provider
from gateway.dispatch.key_shares import CONCURRENCY, RATE, ShareBook, Unit
from gateway.shared.errors import GatewayError


@dataclass
class _Waiter:
    providers: frozenset[str]
    granted: asyncio.Future[str]


@dataclass
class _Limit:
    maximum: int | None
    interval: float
    in_flight: int = 0
    next_start: float = field(default=-math.inf)


class ProviderPermits:
    """How many requests this process has in flight per provider, within its `max_concurrency`.

    A request that finds every candidate full waits in line; a freed permit goes to the
    longest-waiting request that can use it, so nobody overtakes a waiter.
    """

    def __init__(
        self, providers: Mapping[str, Provider], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limits = {
            name: _Limit(provider.max_concurrency, provider.min_start_interval_seconds)
            for name, provider in providers.items()
        }
        self._waiters: deque[_Waiter] = deque()
        self._clock = clock

    def reconfigure(self, providers: Mapping[str, Provider]) -> None:
        """Apply a reloaded config's limits; in-flight counts of providers that stay carry over.

        A removed provider keeps its entry while requests are in flight on it, so they still
        release their permits; an idle one is forgotten.
        """
        for name in [name for name, limit in self._limits.items() if name not in providers]:
            if self._limits[name].in_flight <= 0:
                del self._limits[name]
        for name, provider in providers.items():
            limit = self._limits.setdefault(name, _Limit(None, 0.0))
            limit.maximum = provider.max_concurrency
            limit.interval = provider.min_start_interval_seconds

    def _limit(self, provider: str) -> _Limit:
        limit = self._limits.get(provider)
        if limit is None:
            # A provider a reload removed may still be named by a request that started before it.
            limit = self._limits[provider] = _Limit(None, 0.0)
        return limit

    def in_flight(self, provider: str) -> int:
        """Requests this process has in flight on the provider."""
        return self._limit(provider).in_flight

    def available(self, provider: str) -> bool:
        """Whether a request could take a permit for the provider right now."""
        limit = self._limit(provider)
        has_room = limit.maximum is None or limit.in_flight < limit.maximum
        if not has_room:
            return False
        return not self._waiters or not any(
            provider in waiter.providers for waiter in self._waiters
        )

    def try_acquire(self, provider: str) -> bool:
        """Take a permit if one is free and nobody is queued for it."""
        if not self.available(provider):
            return False
        self._limit(provider).in_flight += 1
        return True

    async def acquire_first(self, providers: Sequence[str], timeout: float) -> str | None:  # noqa: ASYNC109 - the wait is the bounded thing itself
        """The first of `providers` (in order) with a free permit, else wait in line for any.

        Returns the provider whose permit was taken, or None when `timeout` passed first.
        """
        for provider in providers:
            if self.try_acquire(provider):
                return provider
        waiter = _Waiter(frozenset(providers), asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(waiter.granted)
        except TimeoutError:
            # A permit handed over at the very moment the wait ran out is still ours.
            return waiter.granted.result() if waiter.granted.done() else None
        except asyncio.CancelledError:
            if waiter.granted.done():
                self.release(waiter.granted.result())  # pass it on to the next in line
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self, provider: str) -> None:
        """Return a permit: hand it to the longest waiter that can use it, else free it."""
        limit = self._limit(provider)
        for waiter in self._waiters:
            if provider in waiter.providers and not waiter.granted.done():
                waiter.granted.set_result(provider)
                self._waiters.remove(waiter)
                return
        limit.in_flight -= 1

    async def pace(self, provider: str) -> None:
        """Wait for the provider's next start slot (`min_start_interval_ms`) and reserve it."""
        limit = self._limit(provider)
        if limit.interval <= 0:
            return
        now = self._clock()
        slot = max(now, limit.next_start)
        limit.next_start = slot + limit.interval
        if slot > now:
            await asyncio.sleep(slot - now)

    def waiting(self, providers: Collection[str]) -> int:
        """Requests queued for any of these providers."""
        return sum(1 for waiter in self._waiters if not waiter.providers.isdisjoint(providers))


class UnitAsker(Protocol):
    """Who asks the store for one more unit of a key's concurrency, and returns idle ones."""

    async def claim_unit(self, key: Key, in_flight: Callable[[], int]) -> Unit:
        """One more unit than `in_flight`, or why not."""
        ...

    def give_back(self, api_key_id: str) -> None:
        """Return the key's idle units beyond what the worker holds, in the background."""
        ...


class KeyLimits:
    """Per-key limits at admission: over this worker's share of `max_concurrency` (once the store
    has no unit to add to it) or of `requests_per_minute` (see `key_shares`), or the start
    interval, is a 429 at once; a store that cannot say whether a unit is free, a 503."""

    def __init__(
        self, *, shares: ShareBook | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Without `shares`, this worker holds every key's whole limits (a cluster of one)."""
        self._in_flight: dict[str, int] = {}
        self._total = 0  # the sum of `_in_flight`
        self._last_start: dict[str, float] = {}
        self._clock = clock
        self.shares = shares if shares is not None else ShareBook(clock=clock)
        # Set once the cluster sync runs: a spent share then asks the store before refusing.
        self.units: UnitAsker | None = None
        self.on_refused: Callable[[str], None] | None = None  # hears each 429/503's reason

    def acquire(self, key: Key, connection_share: ConnectionShare | None = None) -> None:
        """Admit a request for the key on this worker's shares alone, or raise a 429 with a
        Retry-After (no store call: what `admit` does while the share has room).

        `connection_share` bounds one key's requests in progress on this worker once it is
        crowded (see `ConnectionShare`): a request whose body is still arriving holds a
        connection too.
        """
        in_flight = self._check_connections(key, connection_share)
        if not self._has_room(key, in_flight):
            self.shares.refused(key, CONCURRENCY)
            raise self._refusal(key, Unit.AT_LIMIT)
        self._start(key, in_flight)

    async def admit(self, key: Key, connection_share: ConnectionShare | None = None) -> None:
        """As `acquire`, but a key whose share here is spent asks the store for one more unit
        first: 429 only when the key's units are all held across the cluster, 503 when the
        store does not answer in time."""
        in_flight = self._check_connections(key, connection_share)
        if self._has_room(key, in_flight):
            self._start(key, in_flight)
            return
        if self.units is None:
            self.acquire(key, connection_share)
            return
        outcome = await self.units.claim_unit(key, lambda: self.in_flight(key))
        if outcome is not Unit.GRANTED:
            raise self._refusal(key, outcome)
        try:
            self._start(key, self.in_flight(key))
        except GatewayError:
            self._maybe_give_back(key)
            raise

    def _check_connections(self, key: Key, connection_share: ConnectionShare | None) -> int:
        """The key's requests in flight here, or a 429 past its share of the connections while
        the worker is crowded."""
        in_flight = self._in_flight.get(key.id, 0)
        if connection_share is not None and connection_share.refuses(in_flight, self._total):
            self._refused("connection_share")
            raise GatewayError(
                429,
                f"This key already has {in_flight} requests in progress on this gateway worker, "
                f"more than its share ({connection_share.per_key}) of the worker's connections "
                "while they run short; retry shortly.",
                "key_connection_share",
                retry_after=1,
            )
        return in_flight

    def _has_room(self, key: Key, in_flight: int) -> bool:
        share = self.shares.concurrency(key)
        return key.max_concurrency is None or share is None or in_flight < share

    def _refusal(self, key: Key, outcome: Unit) -> GatewayError:
        """The 429 of a key whose units are all in use, or the 503 of an unanswered store."""
        assert key.max_concurrency is not None
        if outcome is Unit.NO_ANSWER:
            self._refused("store_no_answer")
            return GatewayError(
                503,
                f"This key's concurrency limit ({key.max_concurrency}) is counted across the "
                "gateway's workers, and the store that counts it did not answer in time; "
                "retry shortly.",
                "key_limit_unavailable",
                retry_after=1,
            )
        self._refused("concurrency_at_limit")
        return GatewayError(
            429,
            f"Too many concurrent requests for this key (limit {key.max_concurrency}): all "
            "of them are in use across the gateway's workers.",
            "key_concurrency_limit",
            retry_after=1,
            headers=concurrency_headers(key.max_concurrency, 0),
        )

    def _refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)

    def _start(self, key: Key, in_flight: int) -> None:
        """The start interval and the per-minute share, then count the request in."""
        now = self._clock()
        if key.min_start_interval_seconds > 0:
            wait = self._last_start.get(key.id, -math.inf) + key.min_start_interval_seconds - now
            if wait > 0:
                self._refused("start_interval")
                raise GatewayError(
                    429,
                    "Requests for this key are arriving faster than its start interval allows.",
                    "key_rate_limit",
                    retry_after=wait,
                )
        wait = self.shares.take_token(key)
        if wait > 0:
            self.shares.refused(key, RATE)
            self._refused("rate_share")
            raise GatewayError(
                429,
                f"Too many requests per minute for this key (limit {key.requests_per_minute}).",
                "key_rate_limit",
                retry_after=wait,
            )
        if key.min_start_interval_seconds > 0:
            self._last_start[key.id] = now
        self._in_flight[key.id] = in_flight + 1
        self._total += 1
        self.shares.started(key, in_flight + 1)

    def _maybe_give_back(self, key: Key) -> None:
        """Idle units beyond the held share go back to the store (when a sync runs)."""
        if self.units is not None and self.shares.finished(key, self.in_flight(key)):
            self.units.give_back(key.id)

    def in_flight(self, key: Key) -> int:
        """The key's requests in flight in this process."""
        return self._in_flight.get(key.id, 0)

    def remaining_concurrency(self, key: Key) -> int | None:
        """The key's `max_concurrency` less its requests in flight on this worker (None: no
        limit): what it may still have in flight at most, as this worker can tell without
        asking the store (other workers' requests are not counted)."""
        if key.max_concurrency is None:
            return None
        return max(0, key.max_concurrency - self.in_flight(key))

    def in_flight_total(self) -> int:
        """Every key's requests in flight in this process."""
        return self._total

    def in_flight_by_id(self, api_key_id: str) -> int:
        """The requests in flight in this process for the key with this id."""
        return self._in_flight.get(api_key_id, 0)

    def below_mean(self, key: Key) -> bool:
        """Whether the key has fewer requests in flight in this process than the mean of the keys
        that have some."""
        return self._in_flight.get(key.id, 0) * len(self._in_flight) < self._total

    def release(self, key: Key) -> None:
        """A request for the key finished."""
        if key.id in self._in_flight:
            self._total -= 1
        remaining = self._in_flight.get(key.id, 0) - 1
        if remaining > 0:
            self._in_flight[key.id] = remaining
        else:
            self._in_flight.pop(key.id, None)
        if key.max_concurrency is not None:
            self._maybe_give_back(key)


# A worker is crowded once its requests in progress hold this share of its connection cap (the
# same point past which `gateway.edge.site` stops accepting in batches): only then is a key held
# to its share, so one client may use an uncrowded worker whole, and the last quarter of the
# connections stays for the other keys.
CROWDED_SHARE = 0.75


@dataclass(frozen=True)
class ConnectionShare:
    """One key's share of a worker's connections, and when it applies.

    A key past `per_key` requests in progress on the worker is refused only while the worker's
    requests in progress (every key's) are at least `crowded`: an honest batch client on a quiet
    worker is never refused, and a flooding key holds at most `max(per_key, crowded)`, which
    leaves the rest of the cap to the other keys (each admitted until it too is past `per_key`).
    """

    per_key: int
    crowded: int

    @classmethod
    def of(cls, max_connections: int, share: float) -> ConnectionShare:
        """The share for a connection cap: `per_key_limit`, applied from `CROWDED_SHARE` of it."""
        return cls(
            per_key=per_key_limit(max_connections, share),
            crowded=max(1, math.floor(max_connections * CROWDED_SHARE)),
        )

    def refuses(self, key_in_flight: int, worker_in_flight: int) -> bool:
        """Whether a key with `key_in_flight` requests here is refused one more."""
        return key_in_flight >= self.per_key and worker_in_flight >= self.crowded


def per_key_limit(max_connections: int, share: float) -> int:
    """How many requests one key may have in progress on a worker: `share` of its connection
    cap, rounded down, and at least one. A connection is accepted before its request head names
    a key, so the cap itself cannot tell keys apart; this share, taken once the head is in, can."""
    return max(1, math.floor(max_connections * share))


def concurrency_headers(limit: int, remaining: int) -> dict[str, str]:
    """The gateway's own `x-ratelimit-*` headers for a key's concurrency limit (in this worker)."""
    return {
        "x-ratelimit-limit-concurrency": str(limit),
        "x-ratelimit-remaining-concurrency": str(max(0, remaining)),
    }
