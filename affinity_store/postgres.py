"""`PostgresAffinityStore`: the affinity store on an asyncpg pool, safe behind PgBouncer."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any, TypeAlias

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from affinity_store.driver_errors import translated_driver_errors
from affinity_store.locks import (
    JANITOR_LOCK_KEY,
    MAINTENANCE_NAMESPACE,
    NAMESPACE,
    SHARES_NAMESPACE,
    SPREAD_NAMESPACE,
    binding_lock_key,
)
from affinity_store.queries import Queries, load_queries
from affinity_store.shares import ShareRow, grant, rotation_salt
from affinity_store.spread import COUNTER_SHARDS, choose_candidate, counter_shard
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
    UnitGrant,
    WorkerSnapshot,
)

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


@contextlib.asynccontextmanager
async def store_boundary(seconds: float) -> AsyncIterator[None]:
    """Bound the enclosed calls by `seconds` and turn driver errors into StoreErrors."""
    with translated_driver_errors(seconds):
        async with asyncio.timeout(seconds):
            yield


async def _skip_session_reset(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """Leave a released connection as it is: the store keeps no session state.

    Every setting and lock the store takes is transaction-scoped, and asyncpg still rolls
    back an open transaction before calling this, so the default reset query would only
    add a round trip to every call.
    """


async def create_pool(
    url: str,
    *,
    min_size: int,
    max_size: int,
    statement_cache_size: int,
    connect_eagerly: bool = True,
    connect_timeout: float = 10.0,
) -> Pool:
    """Open an asyncpg pool for the store; `statement_cache_size=0` behind PgBouncer in
    transaction-pooling mode. Released connections skip asyncpg's session reset query.

    With `connect_eagerly=False` connections open only on demand (`min_size` is not kept),
    so a gateway can start while the database is down.
    """
    with translated_driver_errors():
        return await asyncpg.create_pool(
            url,
            min_size=min_size if connect_eagerly else 0,
            max_size=max_size,
            statement_cache_size=statement_cache_size,
            reset=_skip_session_reset,
            timeout=connect_timeout,
            server_settings={"application_name": "affinity-gateway"},
        )


def _binding_from_record(record: asyncpg.Record) -> Binding:
    """Build a Binding from a row with the store's standard binding columns."""
    return Binding(
        api_key_id=record["api_key_id"],
        model=record["model"],
        provider=record["provider"],
        routing_identity=record["routing_identity"],
        expires_at=record["expires_at"],
        ttl_remaining=record["ttl_remaining"],
    )


def _duration_setting(seconds: float) -> str:
    """Format seconds as a Postgres duration setting in whole milliseconds (at least 1)."""
    return f"{max(1, round(seconds * 1000))}ms"


class PostgresAffinityStore:
    """The affinity store on a shared asyncpg pool; only transaction-scoped state is used."""

    def __init__(self, pool: Pool, *, queries: Queries | None = None) -> None:
        """Use `pool` (owned by the caller) and the packaged queries unless others are given."""
        self._pool = pool
        self._queries = queries if queries is not None else load_queries()

    async def warm_up(self, connections: int, *, timeout: float) -> int:
        """Open up to `connections` pool connections now and prepare the look-up on each, so a
        burst of first requests does not wait for either; return how many are ready."""

        async def prepare() -> Connection:
            connection = await self._pool.acquire(timeout=timeout)
            try:
                await connection.fetchrow(self._queries.lookup, "", "")
            except BaseException:
                await self._pool.release(connection)
                raise
            return connection

        outcomes = await asyncio.gather(
            *(prepare() for _ in range(connections)), return_exceptions=True
        )
        ready = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
        for connection in ready:
            await self._pool.release(connection)
        return len(ready)

    async def lookup(self, api_key_id: str, model: str, *, timeout: float) -> Binding | None:
        """Return the live binding with one indexed SELECT and no lock, or None."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            record = await connection.fetchrow(self._queries.lookup, api_key_id, model)
        return None if record is None else _binding_from_record(record)

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
        """Return the live acceptable binding or bind a preferred candidate chosen by `spread`
        over the counters, in one short transaction under the key's advisory lock (and, when
        the spread names a group, the group's lock, taken second)."""
        if not preferred:
            raise ValueError("claim needs at least one preferred candidate")
        queries = self._queries
        async with self._locked(api_key_id, model, timeout) as (connection, existing):
            live = existing is not None and existing["ttl_remaining"] > 0
            if live and existing is not None and existing["provider"] in acceptable:
                return _binding_from_record(existing)
            if spread.group is not None:
                # Claims of one group read the counts one at a time: each sees the last's.
                await connection.execute(
                    queries.lock_binding, SPREAD_NAMESPACE, binding_lock_key(spread.group, "")
                )
            identities = sorted({candidate.routing_identity for candidate in preferred})
            records = await connection.fetch(queries.count_bindings, identities)
            counts = {record["routing_identity"]: record["bindings"] for record in records}
            if existing is not None and existing["routing_identity"] in counts:
                counts[existing["routing_identity"]] -= 1  # the row being replaced
            chosen = choose_candidate(preferred, counts, spread)
            return await self._write(
                connection,
                api_key_id=api_key_id,
                model=model,
                chosen=chosen,
                ttl_seconds=ttl_seconds,
                existing=existing,
            )

    @contextlib.asynccontextmanager
    async def _locked(
        self, api_key_id: str, model: str, timeout: float
    ) -> AsyncIterator[tuple[Connection, asyncpg.Record | None]]:
        """A transaction holding the key's advisory lock and its row (any expiry), if any."""
        queries = self._queries
        deadline = asyncio.get_running_loop().time() + timeout
        async with (
            store_boundary(timeout),
            self._pool.acquire() as connection,
            connection.transaction(),
        ):
            remaining = deadline - asyncio.get_running_loop().time()
            await connection.execute(queries.set_transaction_timeouts, _duration_setting(remaining))
            await connection.execute(
                queries.lock_binding, NAMESPACE, binding_lock_key(api_key_id, model)
            )
            # Read again under the lock: another worker may have claimed it meanwhile.
            yield connection, await connection.fetchrow(queries.lock_row, api_key_id, model)

    async def _write(
        self,
        connection: Connection,
        *,
        api_key_id: str,
        model: str,
        chosen: Candidate,
        ttl_seconds: float,
        existing: asyncpg.Record | None,
    ) -> Binding:
        """Upsert the binding, move its count, and notify listeners (see `write_binding`)."""
        record = await connection.fetchrow(
            self._queries.write_binding,
            api_key_id,
            model,
            chosen.provider,
            chosen.routing_identity,
            ttl_seconds,
            None if existing is None else existing["routing_identity"],
            counter_shard(binding_lock_key(api_key_id, model)),
        )
        if record is None:
            raise StoreError("binding upsert returned no row")
        return _binding_from_record(record)

    async def renew(
        self, api_key_id: str, model: str, *, provider: str, ttl_seconds: float, timeout: float
    ) -> bool:
        """Extend the binding to now + ttl only if it still names `provider`."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            status = await connection.execute(
                self._queries.renew, api_key_id, model, provider, ttl_seconds
            )
        return status != "UPDATE 0"

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
        """Move the binding from `old_provider` to `new`, or create it when the key has none,
        under the key's advisory lock."""
        async with self._locked(api_key_id, model, timeout) as (connection, existing):
            if existing is not None and existing["provider"] != old_provider:
                return False
            await self._write(
                connection,
                api_key_id=api_key_id,
                model=model,
                chosen=new,
                ttl_seconds=ttl_seconds,
                existing=existing,
            )
            return True

    async def renew_many(
        self, renewals: Collection[Renewal], *, ttl_seconds: float, timeout: float
    ) -> set[tuple[str, str]]:
        """Renew every still-matching binding of `renewals` in one statement."""
        if not renewals:
            return set()
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(
                self._queries.renew_many,
                [renewal.api_key_id for renewal in renewals],
                [renewal.model for renewal in renewals],
                [renewal.provider for renewal in renewals],
                ttl_seconds,
            )
        return {(record["api_key_id"], record["model"]) for record in records}

    async def count_bindings(
        self, routing_identities: Collection[str], *, timeout: float
    ) -> dict[str, int]:
        """Bindings per routing identity from the counters, with 0 for identities that have none."""
        identities = sorted(set(routing_identities))
        if not identities:
            return {}
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(self._queries.count_bindings, identities)
        return {record["routing_identity"]: record["bindings"] for record in records}

    async def count_rows(self, *, timeout: float) -> dict[str, int]:
        """A full count of rows per routing identity (a check on the counters; scans the table)."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(self._queries.count_rows)
        return {record["routing_identity"]: record["bindings"] for record in records}

    async def purge_expired(self, *, grace_seconds: float, batch_size: int, timeout: float) -> int:
        """Delete bindings expired beyond the grace period in batches while holding the
        janitor lock; stop early, keeping the count so far, when another janitor holds it."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        deleted_total = 0
        async with store_boundary(timeout), self._pool.acquire() as connection:
            while True:
                async with connection.transaction():
                    locked = await connection.fetchval(
                        self._queries.try_lock_janitor, MAINTENANCE_NAMESPACE, JANITOR_LOCK_KEY
                    )
                    if not locked:
                        return deleted_total
                    deleted = await connection.fetchval(
                        self._queries.purge_expired_batch,
                        grace_seconds,
                        batch_size,
                        random.randrange(COUNTER_SHARDS),
                    )
                deleted_total += int(deleted)
                if deleted < batch_size:
                    return deleted_total

    async def list_bindings(
        self,
        *,
        api_key_id: str | None = None,
        model: str | None = None,
        limit: int = 1000,
        timeout: float,
    ) -> list[Binding]:
        """List live bindings, optionally filtered, ordered by key id then model."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(self._queries.list_bindings, api_key_id, model, limit)
        return [_binding_from_record(record) for record in records]

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
        """Write `response id → provider` for the key in one statement (numbered, the key's
        oldest beyond `max_per_key` evicted); False when the id is another key's."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            written = await connection.fetchval(
                self._queries.record_response,
                response_id,
                provider,
                ttl_seconds,
                api_key_id,
                max_per_key,
            )
        return written is True

    async def response_taken(self, response_id: str, *, api_key_id: str, timeout: float) -> bool:
        """Whether another key's response (live or not yet purged) holds the id, by primary key."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            taken: bool = await connection.fetchval(
                self._queries.response_taken, response_id, api_key_id
            )
        return taken

    async def response_provider(
        self, response_id: str, *, api_key_id: str, timeout: float
    ) -> str | None:
        """The live provider of the key's stored response, by primary key, or None."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            provider: str | None = await connection.fetchval(
                self._queries.response_provider, response_id, api_key_id
            )
        return provider

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
            await connection.execute(queries.set_transaction_timeouts, _duration_setting(remaining))
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
                _duration_setting(timeout),
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
