"""Integration fixtures: a real Postgres (see tests/support/postgres.py) and store harnesses."""

from tests.support.postgres import (  # noqa: F401  (pytest finds fixtures by their name here)
    database_url,
    dedicated_postgres,
    embedded_cluster_seed,
    fresh_data_dir,
    pgbouncer,
    pgbouncer_database_url,
    postgres_for_tests,
    postgres_pool,
)
