"""Where the shared store lives: the configured Postgres, or an embedded one, and its migrations."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import structlog

from affinity_store.embedded import EmbeddedPostgres
from affinity_store.migrate import apply_migrations
from affinity_store.postgres import Pool, create_pool
from affinity_store.postgres_store import PostgresAffinityStore
from affinity_store.store import Binding, StoreError
from affinity_store.usage import PostgresUsageStore, Tokens, UsageKey
from gateway.config import Settings

logger = structlog.get_logger("gateway.selection.database")

MIGRATION_TIMEOUT_SECONDS = 60.0
CLI_TIMEOUT_SECONDS = 30.0


def database_url(settings: Settings) -> str | None:
    """The configured database URL, or None for the embedded default."""
    return settings.database.url.get_secret_value() if settings.database.url else None


def describe_database(url: str) -> dict[str, str | int | None]:
    """Where a database URL points (host, port, database), never its user or password."""
    parts = urlsplit(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        return {"host": None, "port": None, "database": None}
    query = parse_qs(parts.query)
    host = parts.hostname or next(iter(query.get("host", [])), None)
    database = unquote(parts.path.lstrip("/")) or next(iter(query.get("dbname", [])), None)
    return {"host": host, "port": parts.port or 5432, "database": database}


async def open_pool(settings: Settings) -> Pool:
    """A pool for the store; if the database is down, a lazy one, so serving starts degraded."""
    url = database_url(settings)
    assert url is not None  # callers choose the memory store when there is no database
    database = settings.database
    try:
        pool = await create_pool(
            url,
            min_size=database.pool_min_size,
            max_size=database.pool_max_size,
            statement_cache_size=database.statement_cache_size,
        )
    except StoreError as error:
        logger.error("database_unavailable_at_start", error=str(error), detail="starting degraded")
        return await create_pool(
            url,
            min_size=0,
            max_size=database.pool_max_size,
            statement_cache_size=database.statement_cache_size,
            connect_eagerly=False,
        )
    if database.apply_migrations_on_start:
        await migrate(pool)
    return pool


async def migrate(pool: Pool) -> list[str]:
    """Apply pending migrations (exactly once across workers); log and carry on if it fails."""
    try:
        async with asyncio.timeout(MIGRATION_TIMEOUT_SECONDS):
            applied = await apply_migrations(pool)
    except (StoreError, TimeoutError) as error:
        logger.error("migrations_failed", error=str(error))
        return []
    if applied:
        logger.info("migrations_applied", migrations=applied)
    return applied


async def apply_pending(settings: Settings) -> list[str]:
    """`gateway migrate`: apply pending migrations now, failing loudly if the database is down."""
    async with _command_pool(settings) as pool:
        return await apply_migrations(pool)


async def list_bindings(
    settings: Settings, *, key_id: str | None, model: str | None, limit: int
) -> list[Binding]:
    """`gateway bindings`: the live bindings, filtered."""
    async with _command_pool(settings) as pool:
        return await PostgresAffinityStore(pool).list_bindings(
            api_key_id=key_id, model=model, limit=limit, timeout=CLI_TIMEOUT_SECONDS
        )


async def usage_totals(
    settings: Settings, since: datetime, by: Sequence[str]
) -> dict[UsageKey, Tokens]:
    """`gateway usage`: the rollups from minute `since` on, per the `by` fields."""
    async with _command_pool(settings) as pool:
        return await PostgresUsageStore(pool).usage_totals(
            since, timeout=CLI_TIMEOUT_SECONDS, by=by
        )


@asynccontextmanager
async def _command_pool(settings: Settings) -> AsyncIterator[Pool]:
    """A one-connection pool for a command-line call, closed afterwards."""
    url = database_url(settings)
    assert url is not None  # provisioned() always supplies one
    pool = await create_pool(
        url, min_size=1, max_size=1, statement_cache_size=settings.database.statement_cache_size
    )
    try:
        yield pool
    finally:
        await pool.close()


@contextmanager
def provisioned(settings: Settings) -> Iterator[Settings]:
    """Settings with a database URL: the configured one, or an embedded Postgres run meanwhile."""
    if settings.database.url is not None:
        yield settings
        return
    data_dir = Path(settings.database.embedded_data_dir).resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info(
        "embedded_postgres_starting",
        data_dir=str(data_dir),
        detail="single-machine mode: set database.url or DATABASE_URL to share bindings "
        "across machines",
    )
    embedded = EmbeddedPostgres(data_dir)
    # A server already running there belongs to someone else (say, `gateway serve` while
    # `gateway bindings` runs): use it, and leave it running.
    adopted = embedded.is_running()
    embedded.start()
    try:
        database = settings.database.with_embedded_url(embedded.url)
        yield settings.model_copy(update={"database": database})
    finally:
        if not adopted:
            embedded.stop()
            logger.info("embedded_postgres_stopped", data_dir=str(data_dir))
