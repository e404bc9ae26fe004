"""The Postgres store's workers: their registrations (heartbeats, snapshots) and their shares
of each key's limits."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import orjson

from affinity_store.locks import SHARES_NAMESPACE, binding_lock_key
from affinity_store.postgres import PostgresAccess, duration_setting, store_boundary
from affinity_store.shares import ShareRow, grant, rotation_salt
from affinity_store.store import (
    Heartbeat,
    KeyShare,
    ShareGrant,
    StoreError,
    UnitGrant,
    WorkerSnapshot,
)


class PostgresWorkers(PostgresAccess):
    """Live workers (a row each, with a TTL) and the shares of key limits granted to them."""

    async def heartbeat(
        self,
        worker_id: str,
        *,
        ttl_seconds: float,
        timeout: float,
        snapshot: Mapping[str, Any] | None = None,
    ) -> Heartbeat:
        """Renew the worker's row with its snapshot (its shares lapse if it had expired); read
        its standing shares and the live workers (three statements, one row written)."""
        queries = self._queries
        text = None if snapshot is None else orjson.dumps(snapshot).decode()
        async with store_boundary(timeout), self._pool.acquire() as connection:
            await connection.execute(queries.register_worker, worker_id, ttl_seconds, text)
            shares = await connection.fetch(queries.own_shares, worker_id)
            workers = await connection.fetch(queries.live_workers)
        return Heartbeat(
            workers=tuple(record["worker_id"] for record in workers),
            shares={
                (record["api_key_id"], record["resource"]): record["granted"] for record in shares
            },
        )

    async def worker_snapshots(self, *, timeout: float) -> list[WorkerSnapshot]:
        """Every live worker with its last snapshot, by worker id (one statement)."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(self._queries.worker_snapshots)
        return [
            WorkerSnapshot(
                record["worker_id"],
                record["started_at"],
                None if record["snapshot"] is None else orjson.loads(record["snapshot"]),
            )
            for record in records
        ]

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
        """Grant the worker its share in one short transaction under the key's advisory lock."""
        queries = self._queries
        deadline = asyncio.get_running_loop().time() + timeout
        async with (
            store_boundary(timeout),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            remaining = deadline - asyncio.get_running_loop().time()
            await connection.execute(queries.set_transaction_timeouts, duration_setting(remaining))
            await connection.execute(
                queries.lock_key_shares, SHARES_NAMESPACE, binding_lock_key(api_key_id, resource)
            )
            if not await connection.fetchval(queries.worker_is_live, worker_id):
                raise StoreError("this worker's registration lapsed: heartbeat before claiming")
            records = await connection.fetch(queries.other_shares, api_key_id, resource, worker_id)
            others = [
                ShareRow(record["worker_id"], record["granted"], record["wanted"])
                for record in records
            ]
            granted, fair = grant(
                limit,
                worker_id,
                wanted=wanted,
                keep=keep,
                others=others,
                salt=rotation_salt(api_key_id, time.time()),
            )
            await connection.execute(
                queries.write_share, api_key_id, resource, worker_id, granted, wanted
            )
        return ShareGrant(granted, fair)

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
        """One statement (`gateway_claim_unit`) that takes the key's share lock, waiting for it
        no longer than the call's deadline, and grants the unit if the key has one free."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            answer: int | None = await connection.fetchval(
                self._queries.claim_unit,
                api_key_id,
                resource,
                worker_id,
                limit,
                needed,
                SHARES_NAMESPACE,
                binding_lock_key(api_key_id, resource),
                duration_setting(timeout),
            )
        if answer is None:
            raise StoreError("this worker's registration lapsed: heartbeat before claiming")
        return UnitGrant(answer, True) if answer >= 0 else UnitGrant(-1 - answer, False)

    async def release_units(
        self, api_key_id: str, resource: str, worker_id: str, *, keep: int, timeout: float
    ) -> None:
        """Lower the worker's grant to `keep` in one UPDATE."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            await connection.execute(
                self._queries.release_units, api_key_id, resource, worker_id, keep
            )

    async def leave(self, worker_id: str, *, timeout: float) -> None:
        """Delete the worker's row and its shares."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            await connection.execute(self._queries.leave, worker_id)

    async def list_shares(self, *, timeout: float) -> list[KeyShare]:
        """Every live share."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(self._queries.list_shares)
        return [
            KeyShare(
                record["api_key_id"],
                record["resource"],
                record["worker_id"],
                record["granted"],
                record["wanted"],
            )
            for record in records
        ]
