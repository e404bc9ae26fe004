"""`MemoryAffinityStore`: an in-process twin of the Postgres store, for tests without a database."""

from __future__ import annotations

from affinity_store.memory_bindings import MemoryBindings
from affinity_store.memory_responses import MemoryResponses
from affinity_store.memory_workers import MemoryWorkers


class MemoryAffinityStore(MemoryBindings, MemoryResponses, MemoryWorkers):
    """The affinity store's semantics in one process: per-key asyncio locks, injectable clock."""
