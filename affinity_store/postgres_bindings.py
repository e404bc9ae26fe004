"""The Postgres store's bindings: look-ups, claims under the key's advisory lock, renewals,
rebinds, the counters a claim's spread reads, and the janitor's purge."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Collection, Sequence

import asyncpg

from affinity_store.locks import (
    JANITOR_LOCK_KEY,
    MAINTENANCE_NAMESPACE,
    NAMESPACE,
    SPREAD_NAMESPACE,
    binding_lock_key,
)
from affinity_store.postgres import Connection, PostgresAccess, duration_setting, store_boundary
from affinity_store.spread import COUNTER_SHARDS, choose_candidate, counter_shard
from affinity_store.store import LEAST_BOUND, Binding, Candidate, Renewal, Spread, StoreError


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


class PostgresBindings(PostgresAccess):
    """`(api_key_id, model) → provider` bindings with sliding expiry, one row each."""

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
            await connection.execute(queries.set_transaction_timeouts, duration_setting(remaining))
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
