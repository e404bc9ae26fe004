"""The Postgres store's access to its database: the pool, the call boundary, the loaded queries.

Every part of `PostgresAffinityStore` (bindings, stored responses, workers and their shares)
works through a `PostgresAccess`: one shared asyncpg pool owned by the caller, and the packaged
SQL. Every call is bounded by its `timeout` and raises `StoreError`s, never driver errors. Only
transaction-scoped state is used, so the store is safe behind PgBouncer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from affinity_store.driver_errors import translated_driver_errors
from affinity_store.queries import Queries, load_queries

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


def duration_setting(seconds: float) -> str:
    """Format seconds as a Postgres duration setting in whole milliseconds (at least 1)."""
    return f"{max(1, round(seconds * 1000))}ms"


class PostgresAccess:
    """A shared asyncpg pool and the store's queries; only transaction-scoped state is used."""

    def __init__(self, pool: Pool, *, queries: Queries | None = None) -> None:
        """Use `pool` (owned by the caller) and the packaged queries unless others are given."""
        self._pool = pool
        self._queries = queries if queries is not None else load_queries()
