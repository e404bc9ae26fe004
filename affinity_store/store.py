"""The affinity store's contract: value types, exceptions and the `AffinityStore` Protocol."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


@dataclass(frozen=True)
class Candidate:
    """A provider the gateway may bind to, listed in the gateway's preference order."""

    provider: str
    routing_identity: str


@dataclass(frozen=True)
class Binding:
    """A live `(api_key_id, model) → provider` binding as the database saw it when read."""

    api_key_id: str
    model: str
    provider: str
    routing_identity: str
    expires_at: datetime
    ttl_remaining: float


@dataclass(frozen=True)
class Spread:
    """How a claim spreads new bindings over its candidates.

    `share`/`minimum`: how many more bindings the first candidate may hold than the least-bound
    one: `share` of the least-bound count, and at least `minimum`. The default (no allowance)
    binds the least-bound candidate, earliest on ties.

    `weights`: each routing identity's capacity (its node's KV cache in tokens) where known;
    counts are compared per unit of capacity, so a node with twice the cache takes twice the
    bindings, and a weight of 0 (a full cache) takes none while any candidate has room.
    Identities without a weight count as the mean of the known ones.

    `group`: claims naming the same group choose one at a time (in Postgres, under one more
    advisory lock taken after the binding's own), so simultaneous claims of one key's new
    conversations each see the others' bindings; None for a claim that need not wait.
    """

    share: float = 0.0
    minimum: int = 0
    weights: Mapping[str, float] = field(default_factory=dict)
    group: str | None = None

    def allowance(self, least: float) -> float:
        """The extra bindings the first candidate may hold over `least`."""
        return max(float(self.minimum), self.share * least)


LEAST_BOUND = Spread()
"""No allowance: a claim binds the least-bound candidate, earliest on ties."""


@dataclass(frozen=True)
class Renewal:
    """A request to extend `(api_key_id, model)` if it is still bound to `provider`."""

    api_key_id: str
    model: str
    provider: str


@dataclass(frozen=True)
class Heartbeat:
    """What a worker's heartbeat learnt: the live workers, and its own shares still standing."""

    workers: tuple[str, ...]
    shares: dict[tuple[str, str], int]  # (api_key_id, resource) -> granted, those still standing


@dataclass(frozen=True)
class WorkerSnapshot:
    """A live worker as its last heartbeat described itself (`snapshot` is None before any)."""

    worker_id: str
    started_at: datetime
    snapshot: Mapping[str, Any] | None


@dataclass(frozen=True)
class ShareGrant:
    """A worker's grant of a key's limit, and the fair share it was measured against."""

    granted: int
    fair: int


@dataclass(frozen=True)
class UnitGrant:
    """The answer to a worker asking for one more unit of a key's limit."""

    granted: int  # the worker's grant now (unchanged when refused)
    admitted: bool  # False: the key's grants across the live workers are at its limit


@dataclass(frozen=True)
class KeyShare:
    """One live worker's share of one key's limit."""

    api_key_id: str
    resource: str
    worker_id: str
    granted: int
    wanted: int


class StoreError(Exception):
    """Any failure of the affinity store; driver errors become this (or a subclass)."""


class StoreUnavailable(StoreError):  # noqa: N818  (name fixed by the store contract)
    """The database cannot be reached, the connection was lost, or it is shutting down."""


class StoreTimeout(StoreError):  # noqa: N818  (name fixed by the store contract)
    """A call's client-side deadline, lock timeout or statement timeout was hit."""


class AffinityStore(Protocol):
    """Shared bindings of `(api_key_id, model)` to a provider, with sliding expiry.

    Every call takes a `timeout` in seconds that bounds it end to end and raises
    `StoreError` (usually `StoreUnavailable` or `StoreTimeout`) instead of driver errors.
    """

    async def lookup(self, api_key_id: str, model: str, *, timeout: float) -> Binding | None:
        """Return the live binding without taking any lock, or None."""
        ...

    async def claim(
        self,
        api_key_id: str,
        model: str,
        *,
        acceptable: Collection[str],
        preferred: Sequence[Candidate],
        ttl_seconds: float,
        timeout: float,
        spread: Spread = LEAST_BOUND,
    ) -> Binding:
        """Return the live binding if its provider is acceptable, else bind a preferred
        candidate under the key's lock: the first unless it holds more bindings than the
        least-bound one plus the `spread` allowance (see `spread.choose_candidate`); raise
        ValueError when `preferred` is empty."""
        ...

    async def renew(
        self, api_key_id: str, model: str, *, provider: str, ttl_seconds: float, timeout: float
    ) -> bool:
        """Extend the binding to now + ttl only if it still names `provider`; True if it did."""
        ...

    async def rebind(
        self,
        api_key_id: str,
        model: str,
        *,
        old_provider: str,
        new: Candidate,
        ttl_seconds: float,
        timeout: float,
    ) -> bool:
        """Move the binding from `old_provider` to `new` (or create it when absent); True if
        it took effect, False when the binding names some other provider."""
        ...

    async def renew_many(
        self, renewals: Collection[Renewal], *, ttl_seconds: float, timeout: float
    ) -> set[tuple[str, str]]:
        """Renew each `(api_key_id, model)` whose binding still names the given provider, in
        one statement; return the pairs that were renewed."""
        ...

    async def count_bindings(
        self, routing_identities: Collection[str], *, timeout: float
    ) -> dict[str, int]:
        """Bindings per routing identity as a claim's spread counts them, 0 when none: every
        row the janitor has not yet deleted, live or recently expired. Read from maintained
        counters, so the cost does not grow with the table."""
        ...

    async def purge_expired(self, *, grace_seconds: float, batch_size: int, timeout: float) -> int:
        """Delete bindings expired longer than the grace period, one worker at a time, in
        batches; return how many rows this call deleted."""
        ...

    async def list_bindings(
        self,
        *,
        api_key_id: str | None = None,
        model: str | None = None,
        limit: int = 1000,
        timeout: float,
    ) -> list[Binding]:
        """List live bindings, optionally filtered, ordered by key id then model."""
        ...

    async def record_response(
        self,
        response_id: str,
        provider: str,
        *,
        api_key_id: str,
        ttl_seconds: float,
        max_per_key: int,
        timeout: float,
    ) -> bool:
        """Remember that a stored response of the key lives on `provider`, for `ttl_seconds`;
        False (nothing written) when the id is another key's: a response stays its creator's.
        The key keeps its newest `max_per_key` responses: a new one evicts its oldest."""
        ...

    async def response_taken(self, response_id: str, *, api_key_id: str, timeout: float) -> bool:
        """Whether the id names another key's stored response (live or expired but not yet
        deleted): such an id cannot be recorded for this key."""
        ...

    async def response_provider(
        self, response_id: str, *, api_key_id: str, timeout: float
    ) -> str | None:
        """The provider holding the key's stored response, or None when unknown, expired or
        created by another key."""
        ...

    async def heartbeat(
        self,
        worker_id: str,
        *,
        ttl_seconds: float,
        timeout: float,
        snapshot: Mapping[str, Any] | None = None,
    ) -> Heartbeat:
        """Register or renew the worker for `ttl_seconds`; return the live workers (itself
        included) and its shares that still stand. A worker whose registration had expired
        loses its shares: they count for nothing once it expired, and may have been granted
        to others. A `snapshot` (small, JSON-serialisable) replaces the worker's last one."""
        ...

    async def worker_snapshots(self, *, timeout: float) -> list[WorkerSnapshot]:
        """Every live worker with its last snapshot, by worker id."""
        ...

    async def claim_share(
        self,
        api_key_id: str,
        resource: str,
        worker_id: str,
        *,
        limit: int,
        wanted: int,
        keep: int,
        timeout: float,
    ) -> ShareGrant:
        """Under the key's lock (the worker must be registered and live, else StoreError):
        record what the worker wants of the key's `limit` and grant it
        its fair share, at least `keep` and never more than the other live shares leave free
        (see `shares.grant`); return the grant and the fair share."""
        ...

    async def claim_unit(
        self,
        api_key_id: str,
        resource: str,
        worker_id: str,
        *,
        limit: int,
        needed: int,
        timeout: float,
    ) -> UnitGrant:
        """In one statement under the key's lock (the worker must be registered and live, else
        StoreError): raise the worker's grant to `needed` if it holds less and the other live
        grants leave room (see `shares.unit_grant`); when they do not, record `needed` as its
        want, so holders over their fair share give back at their next claim."""
        ...

    async def release_units(
        self, api_key_id: str, resource: str, worker_id: str, *, keep: int, timeout: float
    ) -> None:
        """Lower the worker's grant of the key's limit to `keep` (no lock: it only frees)."""
        ...

    async def leave(self, worker_id: str, *, timeout: float) -> None:
        """Forget the worker and its shares at once (a clean stop)."""
        ...

    async def list_shares(self, *, timeout: float) -> list[KeyShare]:
        """Every live share, ordered by key id, resource and worker."""
        ...
