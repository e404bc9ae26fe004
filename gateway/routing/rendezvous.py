"""Rendezvous (highest-random-weight) hashing: the provider every process picks for a key.

Each `(key id, model, provider)` gets a pseudo-random weight that every process computes alike;
the highest weight wins. Removing a provider moves only the keys it was winning, and the order
in which candidates are listed does not matter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def rendezvous_weight(api_key_id: str, model: str, provider: str) -> int:
    """The 64-bit weight of `provider` for `(api_key_id, model)`, equal in every process."""
    digest = hashlib.blake2b(digest_size=8)
    for part in (api_key_id, model, provider):
        encoded = part.encode("utf-8")
        # A length prefix keeps ("ab", "c") and ("a", "bc") apart.
        digest.update(len(encoded).to_bytes(4, "big"))
        digest.update(encoded)
    return int.from_bytes(digest.digest(), "big")


def rendezvous_order(api_key_id: str, model: str, providers: Iterable[str]) -> list[str]:
    """`providers` from the highest weight for `(api_key_id, model)` down (the winner first)."""
    return sorted(
        providers,
        key=lambda provider: (-rendezvous_weight(api_key_id, model, provider), provider),
    )
