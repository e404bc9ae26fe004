"""This worker's shares of each key's cluster-wide limits, as last granted by the store.

The request path reads and counts here (no I/O): `ClusterShares` (cluster_shares.py) asks the
store for grants in the background and writes them in, and asks for one more unit of a key's
`max_concurrency` when a request finds the share spent. A share is a whole number of concurrent
requests, or a number of requests per minute spent from a token bucket. Every store write of a
worker's share of one limit happens under that share's lock, so the book always knows what the
store holds for it (or less).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

from gateway.catalog import Key

CONCURRENCY = "max_concurrency"
RATE = "requests_per_minute"
# How many heartbeats a worker's demand is remembered for before its unused share goes back.
DEMAND_BEATS = 5
# A rate share's bucket holds this many seconds of its tokens (at least one token).
BURST_SECONDS = 10.0


class Unit(Enum):
    """The outcome of asking the store for one more unit of a key's concurrency."""

    GRANTED = "granted"
    AT_LIMIT = "at_limit"  # the key's grants across the live workers are at its limit
    NO_ANSWER = "no_answer"  # the store did not answer within the deadline (or this worker lapsed)


@dataclass
class _Share:
    """One key's limit as this worker holds it."""

    limit: int
    granted: int
    fair: int | None = None  # the fair share the store last computed, None before any grant
    ceiling: int | None = None  # while a shrinking claim is in flight: use no more than this
    peak: int = 0  # concurrency: most in flight since the last beat; rate: requests seen
    rejected: int = 0
    history: deque[tuple[float, int, int]] = field(
        default_factory=lambda: deque(maxlen=DEMAND_BEATS)
    )  # (beat time, peak or seen, rejected) per past beat
    tokens: float = 0.0
    refilled_at: float = 0.0
    # concurrency: what the sync decided to hold when idle (units beyond it go back after use),
    # and the fewest requests in flight since the last beat (what was in use all along).
    held: int = 0
    floor: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    returning: bool = False  # a give-back of idle units is under way
    # When the last unit claim that found the key's limit in use was sent (None: since then a
    # unit was granted, or a request of the key ended here).
    full_since: float | None = None

    @property
    def usable(self) -> int:
        """The grant, lowered while a shrinking claim is in flight."""
        return self.granted if self.ceiling is None else min(self.granted, self.ceiling)


@dataclass(frozen=True)
class Claim:
    """What the background sync asks the store for one key's limit."""

    api_key_id: str
    resource: str
    limit: int
    wanted: int
    keep: int


def provisional(limit: int, workers: int) -> int:
    """The share a worker uses before it has ever reached the store: its replica's even split."""
    return max(1, math.ceil(limit / max(1, workers)))


class ShareBook:
    """Per key and limit: what this worker may use, what it used, and what it was refused."""

    def __init__(self, *, workers: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        """`workers` is the worker count assumed until the store says otherwise."""
        self._shares: dict[tuple[str, str], _Share] = {}
        self._clock = clock
        self.workers = workers
        self.synced = False  # whether any grant came from the store
        self.wake = asyncio.Event()  # set when a refused request wants more than the share
        # Until when the store counts this worker's grants (its registration's expiry, as this
        # worker's own clock bounds it); None before the first heartbeat.
        self.valid_until: float | None = None
        self.lapses = 0  # times this worker's registration lapsed and its grants were dropped

    def _share(self, api_key_id: str, resource: str, limit: int) -> _Share:
        share = self._shares.get((api_key_id, resource))
        if share is None:
            # Once in step with the store, a limit it has not seen (a reload added it) starts
            # at nothing until the sync claims it: any guess could exceed the limit.
            granted = 0 if self.synced else provisional(limit, self.workers)
            share = _Share(
                limit, granted, tokens=_capacity(granted), refilled_at=self._clock(), held=granted
            )
            self._shares[(api_key_id, resource)] = share
            self.wake.set()
        share.limit = limit
        return share

    def track(self, keys: Iterable[Key]) -> None:
        """Keep a share for every limit of these keys (a reload's), and forget other keys."""
        wanted: set[tuple[str, str]] = set()
        for key in keys:
            limits = ((CONCURRENCY, key.max_concurrency), (RATE, key.requests_per_minute))
            for resource, limit in limits:
                if limit is not None:
                    self._share(key.id, resource, limit)
                    wanted.add((key.id, resource))
        for gone in [name for name in self._shares if name not in wanted]:
            del self._shares[gone]

    @property
    def empty(self) -> bool:
        """Whether no key has a cluster-wide limit."""
        return not self._shares

    def concurrency(self, key: Key) -> int | None:
        """How many of the key's requests this worker may have in flight (None: no limit);
        none once the worker's registration lapsed (see `lapsed`)."""
        if key.max_concurrency is None:
            return None
        self.lapsed()
        return self._share(key.id, CONCURRENCY, key.max_concurrency).usable

    def lapsed(self) -> bool:
        """Whether the store may no longer count this worker's grants (its registration expired
        before a heartbeat renewed it). The first time, every concurrency grant is dropped
        here: the store may hand those units to others, so using them could exceed the limit."""
        if self.valid_until is None or self._clock() < self.valid_until:
            return False
        self.valid_until = None
        self.lapses += 1
        for (_, resource), share in self._shares.items():
            if resource == CONCURRENCY:
                share.granted = share.held = 0
                share.ceiling = share.fair = None
        return True

    def now(self) -> float:
        """The book's clock (monotonic seconds)."""
        return self._clock()

    @property
    def registered(self) -> bool:
        """Whether the store counts this worker's grants now."""
        return not self.lapsed() and self.valid_until is not None

    def lock(self, api_key_id: str, resource: str) -> asyncio.Lock:
        """The lock every store write of this worker's share of the limit is made under (a
        lock of its own for a limit a reload just removed: nothing is written for it)."""
        share = self._shares.get((api_key_id, resource))
        return asyncio.Lock() if share is None else share.lock

    def started(self, key: Key, in_flight: int) -> None:
        """A request for the key was admitted; `in_flight` now run here."""
        if key.max_concurrency is not None:
            share = self._share(key.id, CONCURRENCY, key.max_concurrency)
            share.peak = max(share.peak, in_flight)

    def finished(self, key: Key, in_flight: int) -> bool:
        """A request for the key ended, leaving `in_flight` here: True when units beyond what the
        worker holds for its next requests are idle and no give-back is under way (the caller
        starts one: `give_back`)."""
        share = self._shares.get((key.id, CONCURRENCY))
        if share is None:
            return False
        share.floor = min(share.floor, in_flight)
        share.full_since = None
        if share.returning or share.granted <= max(in_flight, share.held):
            return False
        share.returning = True
        return True

    def give_back(self, api_key_id: str, in_flight: int) -> int | None:
        """Under the share's lock: lower the grant at once to what is in use or held, and return
        it for the store (None: nothing to give back; the give-back is over)."""
        share = self._shares.get((api_key_id, CONCURRENCY))
        if share is None:
            return None
        keep = max(in_flight, min(share.held, share.granted))
        if keep >= share.granted:
            share.returning = False
            return None
        share.granted = keep
        return keep

    def unit(self, api_key_id: str, granted: int, *, full_since: float | None) -> None:
        """Under the share's lock: the store's answer to a unit claim, the worker's grant now,
        and when the claim was sent if it found the limit in use."""
        share = self._shares.get((api_key_id, CONCURRENCY))
        if share is not None:
            share.granted = granted
            share.full_since = full_since

    def full_since(self, api_key_id: str) -> float | None:
        """When the last unit claim that found the key's limit in use was sent, if still so."""
        share = self._shares.get((api_key_id, CONCURRENCY))
        return None if share is None else share.full_since

    def unsynced(self, api_key_id: str, resource: str) -> None:
        """A write of the share failed: whatever the store holds, claim it afresh next beat."""
        share = self._shares.get((api_key_id, resource))
        if share is not None:
            share.fair = None
            share.returning = False

    def refused(self, key: Key, resource: str) -> None:
        """A request for the key was refused for want of share: ask the store soon."""
        limit = key.max_concurrency if resource == CONCURRENCY else key.requests_per_minute
        if limit is None:
            return
        share = self._share(key.id, resource, limit)
        share.rejected += 1
        if resource == RATE:
            share.peak += 1
        if share.granted < limit:
            self.wake.set()

    def take_token(self, key: Key) -> float:
        """Spend one of the key's per-minute tokens: 0 when taken, else seconds until one is."""
        if key.requests_per_minute is None:
            return 0.0
        share = self._share(key.id, RATE, key.requests_per_minute)
        share.peak += 1
        now = self._clock()
        per_second = share.usable / 60
        capacity = _capacity(share.usable)
        share.tokens = min(capacity, share.tokens + (now - share.refilled_at) * per_second)
        share.refilled_at = now
        if share.tokens >= 1:
            share.tokens -= 1
            return 0.0
        share.peak -= 1  # counted again by `refused`
        if per_second <= 0:
            return 1.0
        return (1 - share.tokens) / per_second

    def claims(self, in_flight: Callable[[str], int]) -> list[Claim]:
        """Close this beat's demand window and list what to ask the store for.

        A share is claimed again when the worker wants a different amount, holds more than an
        even split (so the fair share is worked out again with everyone's latest wants), or
        holds none from the store. A claim that may shrink the share lowers it
        here at once to what it keeps, so nothing admitted meanwhile exceeds the outcome.
        """
        now = self._clock()
        baseline_workers = max(1, self.workers)
        claims = []
        self.lapsed()
        for (api_key_id, resource), share in self._shares.items():
            concurrency = resource == CONCURRENCY
            share.history.append((now, share.floor if concurrency else share.peak, share.rejected))
            busy = in_flight(api_key_id) if concurrency else 0
            share.peak = share.floor = busy
            share.rejected = 0
            # An idle worker holds no unit of a concurrency limit: it asks for one per request.
            baseline = 0 if concurrency else share.limit // baseline_workers
            wanted = min(share.limit, max(baseline, self._demand(share, resource, now)))
            settled = share.fair is not None and share.granted <= min(share.fair, baseline)
            if settled and wanted == share.granted:
                continue  # its even share, in use or not: nothing to rebalance
            if share.fair is None:
                keep = busy  # a provisional share was never the store's to count
            elif wanted < share.granted or share.granted > share.fair:
                keep = max(busy, min(wanted, share.fair))
            else:
                keep = share.granted
            if keep < share.granted:
                share.ceiling = keep
            claims.append(Claim(api_key_id, resource, share.limit, wanted, keep))
        return claims

    @staticmethod
    def _demand(share: _Share, resource: str, now: float) -> int:
        """What the remembered beats ask for: the requests in flight all through a beat plus
        refusals, or a per-minute rate."""
        if resource == CONCURRENCY:
            return max(seen + refused for _, seen, refused in share.history)
        seen = sum(count for _, count, _ in share.history)
        elapsed = max(now - share.history[0][0], 1.0)
        return math.ceil(seen * 60 / elapsed)

    def limit_to(self, api_key_id: str, resource: str, keep: int) -> None:
        """Under the share's lock, before a claim that keeps `keep`: use no more meanwhile."""
        share = self._shares.get((api_key_id, resource))
        if share is not None and keep < share.granted:
            share.ceiling = keep

    def granted(
        self, api_key_id: str, resource: str, granted: int, fair: int | None, wanted: int = 0
    ) -> None:
        """The store's grant for a key's limit from a claim that wanted `wanted`."""
        share = self._shares.get((api_key_id, resource))
        if share is None:
            return
        if resource == RATE and granted < share.granted:
            share.tokens = min(share.tokens, _capacity(granted))
        share.granted = granted
        share.held = min(granted, wanted)
        share.ceiling = None
        if fair is not None:
            share.fair = fair
        self.synced = True

    def standing(self, shares: dict[tuple[str, str], int]) -> int:
        """A heartbeat's view of this worker's grants: a grant the store no longer holds is
        dropped (claimed afresh next), and none is raised by it (the read may predate a
        give-back). Returns how many grants of a unit or more were dropped."""
        dropped = 0
        for name, share in self._shares.items():
            standing = shares.get(name)
            if standing is None:
                dropped += share.granted > 0 and share.fair is not None
                share.granted = share.held = 0
                share.fair = share.ceiling = None
                if name[1] == RATE:
                    share.tokens = 0.0
            else:
                share.granted = min(share.granted, standing)
                share.held = min(share.held, share.granted)
        self.synced = True
        return dropped

    def unsettled(self) -> None:
        """Claims failed: keep the last grants, each lowered to what its claim kept."""
        for share in self._shares.values():
            if share.ceiling is not None:
                share.granted = min(share.granted, share.ceiling)
                share.ceiling = None

    def snapshot(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(key id, resource) → (this worker's share, the key's limit), for the status page."""
        return {name: (share.usable, share.limit) for name, share in self._shares.items()}


def _capacity(granted: int) -> float:
    """A rate share's bucket size: `BURST_SECONDS` of its tokens, at least one (none at 0)."""
    return 0.0 if granted <= 0 else max(1.0, granted * BURST_SECONDS / 60)
