"""Named SQL files and migration files: parsing and validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from affinity_store.migrate import load_migrations
from affinity_store.queries import load_queries, parse_named_queries


def test_named_queries_are_split_on_name_lines() -> None:
    """Each `-- name:` line starts a query that runs to the next one, trimmed."""
    text = "-- header\n-- name: first\nSELECT 1;\n\n-- name: second\nSELECT 2;\n"
    assert parse_named_queries(text) == {"first": "SELECT 1;", "second": "SELECT 2;"}


def test_a_query_name_may_not_repeat() -> None:
    """Two queries with one name are an error, not a silent override."""
    with pytest.raises(ValueError, match="twice"):
        parse_named_queries("-- name: same\nSELECT 1;\n-- name: same\nSELECT 2;\n")


def test_the_packaged_queries_load_completely() -> None:
    """Every query the store needs is present in queries.sql and none is empty."""
    queries = load_queries()
    assert all(text.strip() for text in vars(queries).values())


def test_migrations_load_in_version_order(tmp_path: Path) -> None:
    """Migration files are returned by version, whatever the directory order."""
    (tmp_path / "0002_second.sql").write_text("SELECT 2;")
    (tmp_path / "0001_first.sql").write_text("SELECT 1;")
    (tmp_path / "README.md").write_text("not a migration")
    migrations = load_migrations(tmp_path)
    assert [(migration.version, migration.name) for migration in migrations] == [
        (1, "0001_first.sql"),
        (2, "0002_second.sql"),
    ]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["1_short.sql"], "NNNN_name.sql"),
        (["0001_a.sql", "0001_b.sql"], "twice"),
        ([], "no migrations"),
    ],
)
def test_badly_named_or_duplicate_migrations_are_rejected(
    tmp_path: Path, names: list[str], message: str
) -> None:
    """Misnamed files, repeated versions and an empty folder fail loudly."""
    for name in names:
        (tmp_path / name).write_text("SELECT 1;")
    with pytest.raises(ValueError, match=message):
        load_migrations(tmp_path)


def test_the_repository_migrations_are_found() -> None:
    """From a checkout, the migrator finds the top-level sql/ folder, starting at version 1."""
    migrations = load_migrations()
    assert migrations[0].name == "0001_affinity_bindings.sql"
    assert "CREATE TABLE affinity_bindings" in migrations[0].sql
