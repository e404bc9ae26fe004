"""The in-memory store's bindings: per-key asyncio locks in place of advisory locks, and a
janitor lock so one purge runs at a time."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from affinity_store.memory import MemoryDatabase, utc_now
from affinity_store.spread import choose_candidate
from affinity_store.store import LEAST_BOUND, Binding, Candidate, Renewal, Spread

BindingKey = tuple[str, str]


@dataclass(frozen=True)
class _StoredBinding:
    """One row of the in-memory table."""

    provider: str
    routing_identity: str
    expires_at: datetime
    created_at: datetime
    updated_at: datetime


class MemoryBindings(MemoryDatabase):
    """`(api_key_id, model) → provider` bindings with sliding expiry, one row each."""

    def __init__(self, *, clock: Callable[[], datetime] = utc_now) -> None:
        """Start with no bindings."""
        super().__init__(clock=clock)
        self._rows: dict[BindingKey, _StoredBinding] = {}
        self._key_locks: weakref.WeakValueDictionary[BindingKey, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._janitor_lock = asyncio.Lock()

    def key_lock(self, api_key_id: str, model: str) -> asyncio.Lock:
        """Return the lock claims on this key take (the twin of its advisory lock)."""
        key = (api_key_id, model)
        lock = self._key_locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._key_locks[key] = lock
        return lock

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
