-- Queries of the migrator (see migrate.py), loaded once by name.

-- name: lock_migrations
SELECT pg_advisory_xact_lock($1::int4, $2::int4);

-- name: create_ledger
CREATE TABLE IF NOT EXISTS schema_migrations (
    version int PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: applied_versions
SELECT version FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES ($1, $2);
