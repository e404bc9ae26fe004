"""Integration fixtures: a real Postgres per test, pgbouncer, dedicated servers (tests/support)."""

from tests.support.postgres import (  # noqa: F401  (pytest finds fixtures by their name here)
    database_url,
    dedicated_postgres,
    embedded_cluster_seed,
    fresh_data_dir,
    pgbouncer,
    pgbouncer_database_url,
    postgres_for_tests,
    postgres_pool,
    postgres_scratch,
    scratch_dir,
)
