"""Numbered plain-SQL migrations, applied once each even when many workers start together."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import asyncpg

from affinity_store.driver_errors import translated_driver_errors
from affinity_store.locks import MAINTENANCE_NAMESPACE, MIGRATION_LOCK_KEY
from affinity_store.queries import load_query_set

_MIGRATION_NAME = re.compile(r"^(?P<version>\d{4})_[a-z0-9_]+\.sql$")


@dataclass(frozen=True)
class _LedgerQueries:
    """The migrator's own queries (from `migration_ledger.sql`)."""

    lock_migrations: str
    create_ledger: str
    applied_versions: str
    record_migration: str


@dataclass(frozen=True)
class Migration:
    """One `NNNN_name.sql` file."""

    version: int
    name: str
    sql: str


def migrations_directory() -> Traversable:
    """Return the migrations folder: packaged in an installed wheel, else the checkout's `sql/`."""
    packaged = resources.files("affinity_store") / "sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "sql"


def load_migrations(directory: Traversable | None = None) -> list[Migration]:
    """Read every migration in version order; reject badly named files and duplicate versions."""
    folder = migrations_directory() if directory is None else directory
    migrations: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            raise ValueError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        version = int(match.group("version"))
        if version in migrations:
            raise ValueError(f"migration version {version} appears twice")
        migrations[version] = Migration(
            version=version, name=entry.name, sql=entry.read_text(encoding="utf-8")
        )
    if not migrations:
        raise ValueError(f"no migrations found in {folder}")
    return [migrations[version] for version in sorted(migrations)]


async def _apply_on_connection(
    connection: asyncpg.Connection[asyncpg.Record]
    | asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
    migrations: list[Migration],
) -> list[str]:
    """Apply pending migrations in one transaction under the migration lock."""
    ledger = load_query_set(_LedgerQueries, "migration_ledger.sql")
    applied: list[str] = []
    async with connection.transaction():
        await connection.execute(ledger.lock_migrations, MAINTENANCE_NAMESPACE, MIGRATION_LOCK_KEY)
        await connection.execute(ledger.create_ledger)
        done = {record["version"] for record in await connection.fetch(ledger.applied_versions)}
        for migration in migrations:
            if migration.version in done:
                continue
            await connection.execute(migration.sql)
            await connection.execute(ledger.record_migration, migration.version, migration.name)
            applied.append(migration.name)
    return applied


async def apply_migrations(
    connection_or_pool: asyncpg.Connection[asyncpg.Record] | asyncpg.Pool[asyncpg.Record],
    *,
    migrations: list[Migration] | None = None,
) -> list[str]:
    """Apply every pending migration exactly once and return the names applied by this call;
    database failures raise StoreError (StoreUnavailable when it cannot be reached)."""
    pending = load_migrations() if migrations is None else migrations
    with translated_driver_errors():
        if isinstance(connection_or_pool, asyncpg.Pool):
            async with connection_or_pool.acquire() as connection:
                return await _apply_on_connection(connection, pending)
        return await _apply_on_connection(connection_or_pool, pending)
