"""The Postgres store's stored responses: which provider holds a key's response, by its id."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

from affinity_store.postgres import PostgresAccess, store_boundary


class PostgresResponses(PostgresAccess):
    """`response id → provider` for each key, by primary key, the key's newest few kept."""

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
