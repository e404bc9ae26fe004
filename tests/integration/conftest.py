"""Integration tests get their Postgres fixtures from tests/support/postgres.py.

`pytest_plugins` in tests/conftest.py registers them for every folder: `database_url`,
`postgres_pool`, `pgbouncer_database_url`, `dedicated_postgres`, `fresh_data_dir`,
`scratch_dir` and the session-scoped `postgres_for_tests`.
"""
