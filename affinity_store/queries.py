"""SQL read once from the package's `.sql` files and looked up by name."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from importlib import resources
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

QuerySet = TypeVar("QuerySet", bound="DataclassInstance")

_NAME_LINE = re.compile(r"^--\s*name:\s*(?P<name>[a-z_]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Queries:
    """Every named query the Postgres store runs (from `queries.sql`)."""

    lookup: str
    set_transaction_timeouts: str
    lock_binding: str
    lock_row: str
    count_bindings: str
    write_binding: str
    renew: str
    renew_many: str
    count_rows: str
    notify_binding_channel: str
    try_lock_janitor: str
    purge_expired_batch: str
    list_bindings: str
    record_response: str
    response_taken: str
    response_provider: str
    register_worker: str
    own_shares: str
    live_workers: str
    worker_snapshots: str
    worker_is_live: str
    lock_key_shares: str
    other_shares: str
    write_share: str
    claim_unit: str
    release_units: str
    leave: str
    list_shares: str


def parse_named_queries(text: str) -> dict[str, str]:
    """Split SQL text into `{name: query}` on `-- name: NAME` lines; reject duplicate names."""
    queries: dict[str, str] = {}
    markers = list(_NAME_LINE.finditer(text))
    for index, marker in enumerate(markers):
        end = markers[index + 1].start() if index + 1 < len(markers) else len(text)
        name = marker.group("name")
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = text[marker.end() : end].strip()
    return queries


def load_query_set(query_set: type[QuerySet], filename: str) -> QuerySet:
    """Read a packaged `.sql` file into `query_set`; fail if a query is missing or unexpected."""
    text = resources.files("affinity_store").joinpath(filename).read_text(encoding="utf-8")
    named = parse_named_queries(text)
    expected = {field.name for field in fields(query_set)}
    if set(named) != expected:
        missing = sorted(expected - set(named))
        unexpected = sorted(set(named) - expected)
        raise ValueError(f"{filename}: missing queries {missing}, unexpected {unexpected}")
    return query_set(**named)


def load_queries() -> Queries:
    """Read the store's queries from the packaged `queries.sql`."""
    return load_query_set(Queries, "queries.sql")
