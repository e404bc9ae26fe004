"""Advisory lock keys: the two-integer `(namespace, key)` pairs every worker agrees on.

Postgres advisory locks are identified by two int4 values. The first names what is
locked, so that our locks cannot collide with another application's on the same
database, nor binding locks with maintenance locks.
"""

from __future__ import annotations

import hashlib

NAMESPACE = 0x41464E59
"""Namespace of per-binding locks: `pg_advisory_xact_lock(NAMESPACE, binding_lock_key(...))`.

The value is the ASCII bytes "AFNY" read as a big-endian int32 (1095126617).
"""

MAINTENANCE_NAMESPACE = 0x41464E4D
"""Namespace of maintenance locks (the ASCII bytes "AFNM" as a big-endian int32)."""

SHARES_NAMESPACE = 0x41464E4B
"""Namespace of a key's limit-share lock: `(SHARES_NAMESPACE, binding_lock_key(key, resource))`.

The ASCII bytes "AFNK" as a big-endian int32; written shares of one key's limit queue on it.
"""

SPREAD_NAMESPACE = 0x41464E53
"""Namespace of a spread group's lock: `(SPREAD_NAMESPACE, binding_lock_key(group, ""))`.

The ASCII bytes "AFNS" as a big-endian int32. A claim that names a spread group takes it after
its binding's lock (never the other way round), just before it reads the counts, so claims of
one group choose one at a time.
"""

MIGRATION_LOCK_KEY = 1
"""Key in `MAINTENANCE_NAMESPACE` held while migrations are applied."""

JANITOR_LOCK_KEY = 2
"""Key in `MAINTENANCE_NAMESPACE` held while a janitor batch deletes expired bindings."""


def binding_lock_key(api_key_id: str, model: str) -> int:
    """Return a stable signed 32-bit hash of `(api_key_id, model)`, equal in every process."""
    digest = hashlib.sha256()
    for part in (api_key_id, model):
        encoded = part.encode("utf-8")
        # A length prefix keeps ("ab", "c") and ("a", "bc") apart.
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    return int.from_bytes(digest.digest()[:4], "big", signed=True)
