"""`MemoryAffinityStore`: an in-process twin of the Postgres store, for tests without a database."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from affinity_store.shares import ShareRow, grant, rotation_salt, unit_grant
from affinity_store.spread import choose_candidate
from affinity_store.store import (
    LEAST_BOUND,
    Binding,
    Candidate,
    Heartbeat,
    KeyShare,
    Renewal,
    ShareGrant,
    Spread,
    StoreError,
    StoreTimeout,
    UnitGrant,
    WorkerSnapshot,
)

BindingKey = tuple[str, str]
ShareKey = tuple[str, str, str]  # api_key_id, resource, worker_id
RESPONSE_PURGE_GRACE = timedelta(minutes=5)
RESPONSE_PURGE_BATCH = 10


@dataclass(frozen=True)
class _StoredResponse:
    """One row of the in-memory response table."""

    provider: str
    expires_at: datetime
    api_key_id: str
    sequence: int


@dataclass(frozen=True)
class _StoredBinding:
    """One row of the in-memory table."""

    provider: str
    routing_identity: str
    expires_at: datetime
    created_at: datetime
    updated_at: datetime


def _utc_now() -> datetime:
    """Return the current time, tz-aware in UTC."""
    return datetime.now(UTC)


class MemoryAffinityStore:
    """The affinity store's semantics in one process: per-key asyncio locks, injectable clock."""

    def __init__(self, *, clock: Callable[[], datetime] = _utc_now) -> None:
        """Start empty; `clock` returns tz-aware "database" time (defaults to UTC now)."""
        self._clock = clock
        self._rows: dict[BindingKey, _StoredBinding] = {}
        self._key_locks: weakref.WeakValueDictionary[BindingKey, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._janitor_lock = asyncio.Lock()
        self._responses: dict[str, _StoredResponse] = {}  # in write order
        self._responses_by_key: dict[str, dict[str, int]] = {}  # id -> number, oldest first
        self._response_sequences: dict[str, int] = {}
        self._failure: StoreError | None = None
        self._workers: dict[str, datetime] = {}  # worker id -> expiry
        self._started: dict[str, datetime] = {}
        self._snapshots: dict[str, dict[str, Any]] = {}
        self._shares: dict[ShareKey, tuple[int, int]] = {}  # granted, wanted

    def fail_with(self, error: StoreError | None) -> None:
        """Make every later call raise `error` (simulating an outage) until given None."""
        self._failure = error

    def key_lock(self, api_key_id: str, model: str) -> asyncio.Lock:
        """Return the lock claims on this key take (the twin of its advisory lock)."""
        key = (api_key_id, model)
        lock = self._key_locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._key_locks[key] = lock
        return lock

    @contextlib.asynccontextmanager
    async def _boundary(self, seconds: float) -> AsyncIterator[None]:
        """Raise the injected failure, and turn an exceeded deadline into StoreTimeout."""
        if self._failure is not None:
            raise self._failure
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError as error:
            raise StoreTimeout(f"store call exceeded its {seconds:.3f} s deadline") from error

    def _live_row(self, key: BindingKey, now: datetime) -> _StoredBinding | None:
        """Return the row for `key` when it has not expired."""
        row = self._rows.get(key)
        return row if row is not None and row.expires_at > now else None

    @staticmethod
    def _binding(key: BindingKey, row: _StoredBinding, now: datetime) -> Binding:
        """Present a stored row as a Binding read at `now`."""
        return Binding(
            api_key_id=key[0],
            model=key[1],
            provider=row.provider,
            routing_identity=row.routing_identity,
            expires_at=row.expires_at,
            ttl_remaining=(row.expires_at - now).total_seconds(),
        )

    def _counts(
        self, identities: Collection[str], *, excluding: BindingKey | None = None
    ) -> dict[str, int]:
        """Count rows (live or not yet purged) per routing identity, skipping `excluding`."""
        counts = dict.fromkeys(identities, 0)
        for key, row in self._rows.items():
            if key != excluding and row.routing_identity in counts:
                counts[row.routing_identity] += 1
        return counts

    async def lookup(self, api_key_id: str, model: str, *, timeout: float) -> Binding | None:
        """Return the live binding without taking the key's lock, or None."""
        async with self._boundary(timeout):
            now = self._clock()
            key = (api_key_id, model)
            row = self._live_row(key, now)
            return None if row is None else self._binding(key, row, now)

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
        """Return the live acceptable binding or bind a preferred candidate chosen by `spread`,
        under the key's lock."""
        if not preferred:
            raise ValueError("claim needs at least one preferred candidate")
        key = (api_key_id, model)
        async with self._boundary(timeout), self.key_lock(api_key_id, model):
            now = self._clock()
            existing = self._live_row(key, now)
            if existing is not None and existing.provider in acceptable:
                return self._binding(key, existing, now)
            counts = self._counts(
                {candidate.routing_identity for candidate in preferred}, excluding=key
            )
            chosen = choose_candidate(preferred, counts, spread)
            row = _StoredBinding(
                provider=chosen.provider,
                routing_identity=chosen.routing_identity,
                expires_at=now + timedelta(seconds=ttl_seconds),
                created_at=now,
                updated_at=now,
            )
            self._rows[key] = row
            return self._binding(key, row, now)

    async def renew(
        self, api_key_id: str, model: str, *, provider: str, ttl_seconds: float, timeout: float
    ) -> bool:
        """Extend the binding to now + ttl only if it still names `provider`."""
        async with self._boundary(timeout):
            key = (api_key_id, model)
            row = self._rows.get(key)
            if row is None or row.provider != provider:
                return False
            now = self._clock()
            self._rows[key] = replace(
                row, expires_at=now + timedelta(seconds=ttl_seconds), updated_at=now
            )
            return True

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
        """Move the binding from `old_provider` to `new`, or create it when the key has none."""
        async with self._boundary(timeout):
            key = (api_key_id, model)
            row = self._rows.get(key)
            if row is not None and row.provider != old_provider:
                return False
            now = self._clock()
            self._rows[key] = _StoredBinding(
                provider=new.provider,
                routing_identity=new.routing_identity,
                expires_at=now + timedelta(seconds=ttl_seconds),
                created_at=now if row is None else row.created_at,
                updated_at=now,
            )
            return True

    async def renew_many(
        self, renewals: Collection[Renewal], *, ttl_seconds: float, timeout: float
    ) -> set[tuple[str, str]]:
        """Renew each binding that still names its renewal's provider."""
        renewed: set[tuple[str, str]] = set()
        for renewal in renewals:
            if await self.renew(
                renewal.api_key_id,
                renewal.model,
                provider=renewal.provider,
                ttl_seconds=ttl_seconds,
                timeout=timeout,
            ):
                renewed.add((renewal.api_key_id, renewal.model))
        return renewed

    async def count_bindings(
        self, routing_identities: Collection[str], *, timeout: float
    ) -> dict[str, int]:
        """Rows not yet purged per routing identity, with 0 for identities that have none."""
        async with self._boundary(timeout):
            return self._counts(set(routing_identities))

    async def purge_expired(self, *, grace_seconds: float, batch_size: int, timeout: float) -> int:
        """Delete bindings expired beyond the grace period; 0 when another purge is running."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        async with self._boundary(timeout):
            if self._janitor_lock.locked():
                return 0
            async with self._janitor_lock:
                cutoff = self._clock() - timedelta(seconds=grace_seconds)
                doomed = [key for key, row in self._rows.items() if row.expires_at < cutoff]
                for key in doomed:
                    del self._rows[key]
                return len(doomed)

    async def list_bindings(
        self,
        *,
        api_key_id: str | None = None,
        model: str | None = None,
        limit: int = 1000,
        timeout: float,
    ) -> list[Binding]:
        """List live bindings, optionally filtered, ordered by key id then model."""
        async with self._boundary(timeout):
            now = self._clock()
            selected = [
                self._binding(key, row, now)
                for key, row in sorted(self._rows.items())
                if row.expires_at > now
                and (api_key_id is None or key[0] == api_key_id)
                and (model is None or key[1] == model)
            ]
            return selected[:limit]

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
        """Write `response id → provider` for the key, with its expiry and the key's next
        number, evicting the key's responses numbered `max_per_key` or more below it; False
        when the id is another key's."""
        async with self._boundary(timeout):
            now = self._clock()
            # As in Postgres: each write also deletes a few rows expired for a while (the oldest
            # writes come first in the dict, and every row has the same TTL).
            cutoff = now - RESPONSE_PURGE_GRACE
            for stored_id in list(itertools.islice(self._responses, RESPONSE_PURGE_BATCH)):
                if stored_id != response_id and self._responses[stored_id].expires_at < cutoff:
                    self._forget_response(stored_id)
            existing = self._responses.get(response_id)
            if existing is not None and existing.api_key_id != api_key_id:
                return False
            sequence = self._response_sequences.get(api_key_id, 0) + 1
            self._response_sequences[api_key_id] = sequence
            own = self._responses_by_key.setdefault(api_key_id, {})
            for stored_id, number in list(own.items()):
                if number > sequence - max_per_key:
                    break
                if stored_id != response_id:
                    self._forget_response(stored_id)
            self._responses.pop(response_id, None)
            own.pop(response_id, None)
            expires_at = now + timedelta(seconds=ttl_seconds)
            self._responses[response_id] = _StoredResponse(
                provider, expires_at, api_key_id, sequence
            )
            own[response_id] = sequence
            return True

    def _forget_response(self, response_id: str) -> None:
        stored = self._responses.pop(response_id)
        own = self._responses_by_key[stored.api_key_id]
        del own[response_id]
        if not own:
            del self._responses_by_key[stored.api_key_id]

    async def response_taken(self, response_id: str, *, api_key_id: str, timeout: float) -> bool:
        """Whether another key's response (live or not yet purged) holds the id."""
        async with self._boundary(timeout):
            stored = self._responses.get(response_id)
            return stored is not None and stored.api_key_id != api_key_id

    async def response_provider(
        self, response_id: str, *, api_key_id: str, timeout: float
    ) -> str | None:
        """The live provider of the key's stored response, or None."""
        async with self._boundary(timeout):
            stored = self._responses.get(response_id)
            if stored is None or stored.expires_at <= self._clock():
                return None
            return stored.provider if stored.api_key_id == api_key_id else None

    def _live_worker(self, worker_id: str, now: datetime) -> bool:
        expiry = self._workers.get(worker_id)
        return expiry is not None and expiry > now

    async def heartbeat(
        self,
        worker_id: str,
        *,
        ttl_seconds: float,
        timeout: float,
        snapshot: Mapping[str, Any] | None = None,
    ) -> Heartbeat:
        """Renew the worker with its snapshot (its shares lapse if it had expired); return the
        live workers and its standing shares."""
        async with self._boundary(timeout):
            now = self._clock()
            if not self._live_worker(worker_id, now):
                self._drop_shares(worker_id)
            self._workers[worker_id] = now + timedelta(seconds=ttl_seconds)
            self._started.setdefault(worker_id, now)
            if snapshot is not None:
                self._snapshots[worker_id] = dict(snapshot)
            shares = {
                (api_key_id, resource): granted
                for (api_key_id, resource, holder), (granted, _) in self._shares.items()
                if holder == worker_id
            }
            live = sorted(worker for worker in self._workers if self._live_worker(worker, now))
            return Heartbeat(workers=tuple(live), shares=shares)

    def _drop_shares(self, worker_id: str) -> None:
        for share in [share for share in self._shares if share[2] == worker_id]:
            del self._shares[share]

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
        """Grant the worker its share (one event-loop step: nothing interleaves)."""
        async with self._boundary(timeout):
            now = self._clock()
            if not self._live_worker(worker_id, now):
                raise StoreError("this worker's registration lapsed: heartbeat before claiming")
            others = [
                ShareRow(holder, granted, want)
                for (key, kind, holder), (granted, want) in sorted(self._shares.items())
                if key == api_key_id
                and kind == resource
                and holder != worker_id
                and self._live_worker(holder, now)
            ]
            granted, fair = grant(
                limit,
                worker_id,
                wanted=wanted,
                keep=keep,
                others=others,
                salt=rotation_salt(api_key_id, now.timestamp()),
            )
            self._shares[(api_key_id, resource, worker_id)] = (granted, wanted)
            return ShareGrant(granted, fair)

    async def worker_snapshots(self, *, timeout: float) -> list[WorkerSnapshot]:
        """Every live worker with its last snapshot, by worker id."""
        async with self._boundary(timeout):
            now = self._clock()
            return [
                WorkerSnapshot(worker, self._started[worker], self._snapshots.get(worker))
                for worker in sorted(self._workers)
                if self._live_worker(worker, now)
            ]

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
        """Grant one more unit if the key has one free (one event-loop step, like the lock)."""
        async with self._boundary(timeout):
            now = self._clock()
            if not self._live_worker(worker_id, now):
                raise StoreError("this worker's registration lapsed: heartbeat before claiming")
            mine, wanted = self._shares.get((api_key_id, resource, worker_id), (0, 0))
            others = sum(
                granted
                for (key, kind, holder), (granted, _) in self._shares.items()
                if key == api_key_id
                and kind == resource
                and holder != worker_id
                and self._live_worker(holder, now)
            )
            granted = unit_grant(limit, needed, mine=mine, others=others)
            if granted is not None and granted == mine:
                return UnitGrant(mine, True)
            self._shares[(api_key_id, resource, worker_id)] = (
                mine if granted is None else granted,
                max(wanted, needed),
            )
            return UnitGrant(mine, False) if granted is None else UnitGrant(granted, True)

    async def release_units(
        self, api_key_id: str, resource: str, worker_id: str, *, keep: int, timeout: float
    ) -> None:
        """Lower the worker's grant to `keep`."""
        async with self._boundary(timeout):
            share = (api_key_id, resource, worker_id)
            if share in self._shares:
                granted, wanted = self._shares[share]
                self._shares[share] = (min(granted, keep), wanted)

    async def leave(self, worker_id: str, *, timeout: float) -> None:
        """Forget the worker and its shares."""
        async with self._boundary(timeout):
            self._workers.pop(worker_id, None)
            self._started.pop(worker_id, None)
            self._snapshots.pop(worker_id, None)
            self._drop_shares(worker_id)

    async def list_shares(self, *, timeout: float) -> list[KeyShare]:
        """Every live worker's shares."""
        async with self._boundary(timeout):
            now = self._clock()
            return [
                KeyShare(api_key_id, resource, worker_id, granted, wanted)
                for (api_key_id, resource, worker_id), (granted, wanted) in sorted(
                    self._shares.items()
                )
                if self._live_worker(worker_id, now)
            ]
