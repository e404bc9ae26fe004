"""Integration fixtures come from tests/support/postgres.py, registered for every test folder
by `pytest_plugins` in tests/conftest.py: `database_url`, `postgres_pool`, `pgbouncer_database_url`,
`dedicated_postgres`, `fresh_data_dir`, `scratch_dir` and the session-scoped `postgres_for_tests`."""
