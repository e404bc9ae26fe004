"""How a key's cluster-wide limit is shared out among workers: the arithmetic both stores use."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

# Which workers get the indivisible units of a limit changes this often, so that when more
# workers want a small limit than it has units, none of them waits for ever.
ROTATION_SECONDS = 10.0


@dataclass(frozen=True)
class ShareRow:
    """One live worker's share of one key's limit, as the store holds it."""

    worker_id: str
    granted: int
    wanted: int


def _order(salt: str, worker_id: str) -> bytes:
    """A per-key order of workers, the same in every process, for the last indivisible units."""
    return hashlib.sha256(f"{salt}\n{worker_id}".encode()).digest()


def rotation_salt(api_key_id: str, unix_time: float) -> str:
    """The order key for a key's indivisible units during the current rotation period."""
    return f"{api_key_id}\n{int(unix_time // ROTATION_SECONDS)}"


def fair_shares(limit: int, wants: Mapping[str, int], *, salt: str) -> dict[str, int]:
    """A max-min fair split of `limit` whole units among `wants`: nobody gets more than it
    wants, and nobody who wants more gets less than another. Units that cannot be split evenly
    go one each to workers in an order fixed by `salt` (the key), so keys spread over workers."""
    shares = dict.fromkeys(wants, 0)
    remaining = limit
    hungry = sorted((worker for worker, want in wants.items() if want > 0), key=str)
    while remaining > 0 and hungry:
        each = remaining // len(hungry)
        if each == 0:
            for worker in sorted(hungry, key=lambda name: _order(salt, name))[:remaining]:
                shares[worker] += 1
            break
        for worker in hungry:
            given = min(each, wants[worker] - shares[worker])
            shares[worker] += given
            remaining -= given
        hungry = [worker for worker in hungry if shares[worker] < wants[worker]]
    return shares


def grant(
    limit: int, worker_id: str, *, wanted: int, keep: int, others: list[ShareRow], salt: str
) -> tuple[int, int]:
    """What `worker_id` may hold of `limit` given the other live workers' rows, and its fair share.

    The grant is its fair share of everyone's wants, but never less than `keep` (what it has in
    use) and never more than the others leave free: live grants never sum above `limit`.
    """
    wants = {row.worker_id: row.wanted for row in others}
    wants[worker_id] = max(0, wanted)
    target = fair_shares(limit, wants, salt=salt)[worker_id]
    free = limit - sum(row.granted for row in others)
    return max(0, min(max(target, keep), free)), target


def unit_grant(limit: int, needed: int, *, mine: int, others: int) -> int | None:
    """A worker's grant once it asked for `needed` units of `limit` in all (one more than it has
    in flight): what it holds when that is enough, `needed` when the other live workers' grants
    (`others`) leave room, else None (the key's units are all held: refuse)."""
    if mine >= needed:
        return mine
    if others + needed <= limit:
        return needed
    return None
