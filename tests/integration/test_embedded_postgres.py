"""EmbeddedPostgres: idempotent start and stop, restarts, adoption, stale pid files."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import pytest

from affinity_store.embedded import EmbeddedPostgres, EmbeddedPostgresError
from gateway.config import Settings
from gateway.operations.reload import keep_restart_only
from gateway.selection.database import provisioned
from tests.support.gateway import settings_dict

pytestmark = pytest.mark.timeout(60)


async def query(url: str, sql: str) -> object:
    """Run one query on a fresh connection and return its single value."""
    connection = await asyncpg.connect(url)
    try:
        return await connection.fetchval(sql)
    finally:
        await connection.close()


async def test_start_and_stop_are_idempotent(fresh_data_dir: Path) -> None:
    """Starting twice keeps one server on one port; stopping twice is harmless."""
    server = EmbeddedPostgres(fresh_data_dir, durable=False)
    server.start()
    try:
        url = server.url
        server.start()
        assert server.url == url
        assert await query(url, "SELECT 1") == 1
    finally:
        server.stop()
    server.stop()
    assert not server.is_running()


async def test_test_settings_turn_durability_off(fresh_data_dir: Path) -> None:
    """`durable=False` runs with fsync, synchronous_commit and full-page writes off."""
    with EmbeddedPostgres(fresh_data_dir, durable=False) as server:
        settings = [
            await query(server.url, f"SHOW {name}")
            for name in ("fsync", "synchronous_commit", "full_page_writes")
        ]
    assert settings == ["off", "off", "off"]


async def test_restart_reuses_the_data_directory_on_the_same_port(fresh_data_dir: Path) -> None:
    """Data written before a stop is there after a start, on the port chosen the first time."""
    server = EmbeddedPostgres(fresh_data_dir, durable=False)
    with server:
        port = server.port
        await query(server.url, "CREATE TABLE kept AS SELECT 42 AS answer")
    with server:
        assert server.port == port
        assert await query(server.url, "SELECT answer FROM kept") == 42


async def test_a_second_handle_adopts_the_running_server(fresh_data_dir: Path) -> None:
    """A new object on a data directory in use reports the running server's URL."""
    with EmbeddedPostgres(fresh_data_dir, durable=False) as first:
        second = EmbeddedPostgres(fresh_data_dir)
        second.start()
        assert second.url == first.url
        assert second.is_running()


async def test_a_stale_pid_file_does_not_block_start(fresh_data_dir: Path) -> None:
    """A postmaster.pid left by a dead server is ignored and the server starts."""
    server = EmbeddedPostgres(fresh_data_dir, durable=False)
    server.start()
    server.stop("immediate")
    pid_file = fresh_data_dir / "postmaster.pid"
    stale_lines = ["999999", str(fresh_data_dir), "0", str(server.port), "", "127.0.0.1"]
    pid_file.write_text("\n".join([*stale_lines, "0 0", "ready", ""]))
    with server:
        assert await query(server.url, "SELECT 1") == 1


def test_a_foreign_non_empty_directory_is_refused(scratch_dir: Path) -> None:
    """A directory holding other files is not turned into a data directory."""
    (scratch_dir / "pgdata").mkdir()
    (scratch_dir / "pgdata" / "notes.txt").write_text("mine")
    with pytest.raises(EmbeddedPostgresError, match="neither empty nor"):
        EmbeddedPostgres(scratch_dir / "pgdata").start()


async def test_a_missing_data_directory_is_initialised(scratch_dir: Path) -> None:
    """Starting on a path that does not exist runs initdb there first."""
    with EmbeddedPostgres(scratch_dir / "new" / "pgdata", durable=False) as server:
        assert await query(server.url, "SELECT 1") == 1
    assert (scratch_dir / "new" / "pgdata" / "PG_VERSION").exists()


async def test_logging_in_needs_the_generated_password(fresh_data_dir: Path) -> None:
    """Other local users cannot log in without the password kept in the data directory."""
    with EmbeddedPostgres(fresh_data_dir, durable=False) as server:
        password_free = f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        with pytest.raises(asyncpg.InvalidPasswordError):
            await query(password_free, "SELECT 1")
        assert await query(server.url, "SELECT 1") == 1


def test_reloading_an_unchanged_config_on_the_embedded_postgres_needs_no_restart(
    fresh_data_dir: Path,
) -> None:
    """The embedded server's URL is derived at start, not configured: reloading the same config
    (no URL) reports no `database` change and keeps the running URL; a config that now names a
    URL is a change."""
    config = settings_dict({"node-a": "http://127.0.0.1:9"})
    config["database"] = {"embedded_data_dir": str(fresh_data_dir)}
    configured = Settings.model_validate(config)
    with provisioned(configured) as running:
        assert running.database.url is not None
        effective, restart_needed = keep_restart_only(running, configured)
        assert restart_needed == ()
        assert effective.database == running.database
        config["database"]["url"] = "postgresql://elsewhere/db"
        moved = Settings.model_validate(config)
        assert keep_restart_only(running, moved)[1] == ("database",)
