"""Each key's share of a worker's connections, so one key cannot take them all.

A connection is accepted before its request head names a key, so the worker's connection cap
(`GuardedSite`) cannot tell keys apart. Once a head is in and its key authenticated, the request
takes one of its key's places here, and keeps it until its answer ends: a request whose body is
still trickling in holds a connection (and, behind a load balancer, the balancer's upstream
socket) just as one being answered does. A key at its limit gets 429 before its body is read.
"""

from __future__ import annotations

import math

from gateway.catalog import Key
from gateway.edge.errors import GatewayError


def per_key_limit(max_connections: int, share: float) -> int:
    """How many requests one key may have in progress on a worker: `share` of its connection
    cap, rounded down, and at least one."""
    return max(1, math.floor(max_connections * share))


class ConnectionShares:
    """How many requests each key has in progress on this worker, each within a limit."""

    def __init__(self) -> None:
        self._in_progress: dict[str, int] = {}

    def acquire(self, key: Key, limit: int) -> None:
        """Count a request for the key, or raise a 429 when it already has `limit` in progress."""
        in_progress = self._in_progress.get(key.id, 0)
        if in_progress >= limit:
            raise GatewayError(
                429,
                f"This key already has {limit} requests in progress on this gateway worker, "
                "its share of the worker's connections; retry shortly.",
                "key_connection_share",
                retry_after=1,
            )
        self._in_progress[key.id] = in_progress + 1

    def release(self, key: Key) -> None:
        """A request for the key ended."""
        remaining = self._in_progress.get(key.id, 0) - 1
        if remaining > 0:
            self._in_progress[key.id] = remaining
        else:
            self._in_progress.pop(key.id, None)

    def in_progress(self, key: Key) -> int:
        """The key's requests in progress on this worker."""
        return self._in_progress.get(key.id, 0)
