"""`PostgresAffinityStore`: the affinity store on an asyncpg pool, safe behind PgBouncer."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Sequence
from typing import TypeAlias

import asyncpg

from affinity_store.driver_errors import translated_driver_errors
from affinity_store.locks import (
    JANITOR_LOCK_KEY,
    MAINTENANCE_NAMESPACE,
    NAMESPACE,
    binding_lock_key,
)
from affinity_store.queries import Queries, load_queries
from affinity_store.store import (
    Binding,
    Candidate,
    StoreError,
)

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"


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
    ) -> Binding:
        """Return the live acceptable binding or bind the least-bound preferred candidate,
        in one short transaction under the key's advisory lock."""
        if not preferred:
            raise ValueError("claim needs at least one preferred candidate")
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
            existing = await connection.fetchrow(queries.lookup, api_key_id, model)
            if existing is not None and existing["provider"] in acceptable:
                return _binding_from_record(existing)
            record = await connection.fetchrow(
                queries.bind_least_bound_candidate,
                api_key_id,
                model,
                [candidate.provider for candidate in preferred],
                [candidate.routing_identity for candidate in preferred],
                ttl_seconds,
            )
        if record is None:
            raise StoreError("claim upsert returned no row")
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
        """Move the binding from `old_provider` to `new`, or create it when the key has none."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            took_effect = await connection.fetchval(
                self._queries.rebind,
                api_key_id,
                model,
                old_provider,
                new.provider,
                new.routing_identity,
                ttl_seconds,
            )
        return bool(took_effect)

    async def count_live(
        self, routing_identities: Collection[str], *, timeout: float
    ) -> dict[str, int]:
        """Count live bindings per routing identity, with 0 for identities that have none."""
        identities = sorted(set(routing_identities))
        if not identities:
            return {}
        async with store_boundary(timeout), self._pool.acquire() as connection:
            records = await connection.fetch(self._queries.count_live, identities)
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
                        self._queries.purge_expired_batch, grace_seconds, batch_size
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
        timeout: float,
    ) -> None:
        """Upsert `response id → provider` for the key, with its expiry."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            await connection.execute(
                self._queries.record_response, response_id, provider, ttl_seconds, api_key_id
            )

    async def response_provider(
        self, response_id: str, *, api_key_id: str, timeout: float
    ) -> str | None:
        """The live provider of the key's stored response, by primary key, or None."""
        async with store_boundary(timeout), self._pool.acquire() as connection:
            provider: str | None = await connection.fetchval(
                self._queries.response_provider, response_id, api_key_id
            )
        return provider
