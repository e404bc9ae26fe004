"""The in-memory store's workers: their registrations (heartbeats, snapshots) and their shares
of each key's limits; each grant is one event-loop step, so nothing interleaves with it."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from affinity_store.memory import MemoryDatabase, utc_now
from affinity_store.shares import ShareRow, grant, rotation_salt, unit_grant
from affinity_store.store import (
    Heartbeat,
    KeyShare,
    ShareGrant,
    StoreError,
    UnitGrant,
    WorkerSnapshot,
)

ShareKey = tuple[str, str, str]  # api_key_id, resource, worker_id


class MemoryWorkers(MemoryDatabase):
    """Live workers (each with an expiry) and the shares of key limits granted to them."""

    def __init__(self, *, clock: Callable[[], datetime] = utc_now) -> None:
        """Start with no workers and no shares."""
        super().__init__(clock=clock)
        self._workers: dict[str, datetime] = {}  # worker id -> expiry
        self._started: dict[str, datetime] = {}
        self._snapshots: dict[str, dict[str, Any]] = {}
        self._shares: dict[ShareKey, tuple[int, int]] = {}  # granted, wanted

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
