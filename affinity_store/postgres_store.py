"""`PostgresAffinityStore`: the affinity store on an asyncpg pool, safe behind PgBouncer."""

from __future__ import annotations

from affinity_store.postgres_bindings import PostgresBindings
from affinity_store.postgres_responses import PostgresResponses
from affinity_store.postgres_workers import PostgresWorkers


class PostgresAffinityStore(PostgresBindings, PostgresResponses, PostgresWorkers):
    """The whole `AffinityStore` on one shared pool: bindings, stored responses, workers."""
