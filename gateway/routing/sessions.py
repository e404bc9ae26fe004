"""Per-process session stickiness: the session id of a request and `(key, session) → provider`.

Live bindings are counted per routing identity as they are written, expire and are evicted, so
spreading a new session to the least-bound identity never scans the table.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

SESSION_HEADERS = ("x-session-id", "session_id", "session-id", "conversation_id", "conversation-id")
"""Headers that carry a session id, most specific first; the first present one wins."""

MAX_SESSION_ID_LENGTH = 256
"""Longer ids are truncated, so a client cannot make one binding hold an unbounded string."""

_SESSION_HEADER_NAMES = frozenset(SESSION_HEADERS)


def session_id_from(headers: Mapping[str, str], body: Mapping[str, object]) -> str | None:
    """Return the session id from the headers, else body `metadata.session_id`, else `user`."""
    found: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _SESSION_HEADER_NAMES and lowered not in found:
            cleaned = _cleaned(value)
            if cleaned is not None:
                found[lowered] = cleaned
    for name in SESSION_HEADERS:
        if name in found:
            return found[name]
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping):
        from_metadata = _cleaned(metadata.get("session_id"))
        if from_metadata is not None:
            return from_metadata
    return _cleaned(body.get("user"))


def _cleaned(value: object) -> str | None:
    """Return a usable session id from `value`: a non-blank string, trimmed and length-capped."""
    if not isinstance(value, str):
        return None
    stripped = value.strip()
    return stripped[:MAX_SESSION_ID_LENGTH] if stripped else None


@dataclass(frozen=True, slots=True)
class _Binding:
    """Where one session is bound, and when that was last written."""

    provider: str
    routing_identity: str
    written_at: float
    order: int


class SessionTable:
    """`(key id, session id) → provider` with a TTL from the last write and per-key LRU eviction.

    Bindings sit in an ordered dict in last-write order; with one TTL for all, that is also
    expiry order, so expiring pops from the front. Each key also keeps its own sessions in
    last-write order: when the table is full, the key holding the most bindings loses its least
    recently written one. So a key holding at most an equal split of the table (capacity ÷ the
    keys holding sessions) never loses a session to another key's flood (after the write, the
    largest key holds more than that), and one holding more is cut down to the split, never
    below: stronger isolation cannot be had in a bounded table without refusing newcomers any
    session while one key fills it. Times are
    monotonic seconds; a `now` earlier than the latest write is taken as
    that write's time, which keeps the order (and so the counts) exact.
    """

    def __init__(self, ttl_seconds: float, capacity: int) -> None:
        """Hold at most `capacity` bindings, each live for `ttl_seconds` after its last write."""
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._ttl_seconds = ttl_seconds
        self._capacity = capacity
        self._bindings: OrderedDict[tuple[str, str], _Binding] = OrderedDict()
        self._live_counts: dict[str, int] = {}
        self._by_key: dict[str, OrderedDict[str, None]] = {}
        self._latest_write = -math.inf
        self._writes = 0

    def get(self, key_id: str, session_id: str, now: float) -> str | None:
        """Return the provider the session is bound to, or None when absent or expired."""
        self._expire(now)
        binding = self._bindings.get((key_id, session_id))
        return None if binding is None else binding.provider

    def bind(
        self, key_id: str, session_id: str, provider: str, routing_identity: str, now: float
    ) -> None:
        """Bind the session to `provider` from `now` on, moving its count to `routing_identity`."""
        written_at = max(now, self._latest_write)
        self._latest_write = written_at
        self._expire(written_at)
        key = (key_id, session_id)
        previous = self._bindings.pop(key, None)
        if previous is not None:
            self._uncount(previous.routing_identity)
        self._writes += 1
        self._bindings[key] = _Binding(provider, routing_identity, written_at, self._writes)
        self._live_counts[routing_identity] = self._live_counts.get(routing_identity, 0) + 1
        sessions = self._by_key.setdefault(key_id, OrderedDict())
        sessions[session_id] = None
        sessions.move_to_end(session_id)
        while len(self._bindings) > self._capacity:
            self._evict_one()

    def _evict_one(self) -> None:
        """Drop the least recently written binding of the key that holds the most (of two such
        keys, the one whose oldest binding is older)."""

        def weight(key_id: str) -> tuple[int, int]:
            sessions = self._by_key[key_id]
            return len(sessions), -self._bindings[(key_id, next(iter(sessions)))].order

        key_id = max(self._by_key, key=weight)
        self._remove((key_id, next(iter(self._by_key[key_id]))))

    def live_counts(self, now: float) -> Mapping[str, int]:
        """Return a copy of the live binding count per routing identity (zero counts omitted)."""
        self._expire(now)
        return dict(self._live_counts)

    def __len__(self) -> int:
        """Return how many bindings are held, including expired ones not yet reclaimed."""
        return len(self._bindings)

    def _expire(self, now: float) -> None:
        """Drop bindings last written `ttl_seconds` or longer before `now`."""
        cutoff = now - self._ttl_seconds
        bindings = self._bindings
        while bindings:
            oldest_key = next(iter(bindings))
            oldest = bindings[oldest_key]
            if oldest.written_at > cutoff:
                return
            self._remove(oldest_key)

    def _remove(self, key: tuple[str, str]) -> None:
        """Forget one binding everywhere it is counted."""
        binding = self._bindings.pop(key)
        self._uncount(binding.routing_identity)
        key_id, session_id = key
        sessions = self._by_key[key_id]
        del sessions[session_id]
        if not sessions:
            del self._by_key[key_id]

    def _uncount(self, routing_identity: str) -> None:
        """Remove one binding from its identity's count, forgetting identities that reach zero."""
        remaining = self._live_counts[routing_identity] - 1
        if remaining:
            self._live_counts[routing_identity] = remaining
        else:
            del self._live_counts[routing_identity]
