"""The in-memory store's stored responses: which provider holds a key's response, by its id."""

# The store contract takes a per-call `timeout` (DESIGN §5.5), enforced with asyncio.timeout.
# ruff: noqa: ASYNC109

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from affinity_store.memory import MemoryDatabase, utc_now

RESPONSE_PURGE_GRACE = timedelta(minutes=5)
RESPONSE_PURGE_BATCH = 10


@dataclass(frozen=True)
class _StoredResponse:
    """One row of the in-memory response table."""

    provider: str
    expires_at: datetime
    api_key_id: str
    sequence: int


class MemoryResponses(MemoryDatabase):
    """`response id → provider` for each key, in write order, the key's newest few kept."""

    def __init__(self, *, clock: Callable[[], datetime] = utc_now) -> None:
        """Start with no stored responses."""
        super().__init__(clock=clock)
        self._responses: dict[str, _StoredResponse] = {}  # in write order
        self._responses_by_key: dict[str, dict[str, int]] = {}  # id -> number, oldest first
        self._response_sequences: dict[str, int] = {}

    async def record_response(
        self,
        response_id: str,
        provider: str,
        *,
        api_key_id: str,
        ttl_seconds: float,
        max_per_key: int,
        timeout: float,
    ) -> bool:
        """Write `response id → provider` for the key, with its expiry and the key's next
        number, evicting the key's responses numbered `max_per_key` or more below it; False
        when the id is another key's."""
        async with self._boundary(timeout):
            now = self._clock()
            # As in Postgres: each write also deletes a few rows expired for a while (the oldest
            # writes come first in the dict, and every row has the same TTL).
            cutoff = now - RESPONSE_PURGE_GRACE
            for stored_id in list(itertools.islice(self._responses, RESPONSE_PURGE_BATCH)):
                if stored_id != response_id and self._responses[stored_id].expires_at < cutoff:
                    self._forget_response(stored_id)
            existing = self._responses.get(response_id)
            if existing is not None and existing.api_key_id != api_key_id:
                return False
            sequence = self._response_sequences.get(api_key_id, 0) + 1
            self._response_sequences[api_key_id] = sequence
            own = self._responses_by_key.setdefault(api_key_id, {})
            for stored_id, number in list(own.items()):
                if number > sequence - max_per_key:
                    break
                if stored_id != response_id:
                    self._forget_response(stored_id)
            self._responses.pop(response_id, None)
            own.pop(response_id, None)
            expires_at = now + timedelta(seconds=ttl_seconds)
            self._responses[response_id] = _StoredResponse(
                provider, expires_at, api_key_id, sequence
            )
            own[response_id] = sequence
            return True

    def _forget_response(self, response_id: str) -> None:
        stored = self._responses.pop(response_id)
        own = self._responses_by_key[stored.api_key_id]
        del own[response_id]
        if not own:
            del self._responses_by_key[stored.api_key_id]

    async def response_taken(self, response_id: str, *, api_key_id: str, timeout: float) -> bool:
        """Whether another key's response (live or not yet purged) holds the id."""
        async with self._boundary(timeout):
            stored = self._responses.get(response_id)
            return stored is not None and stored.api_key_id != api_key_id

    async def response_provider(
        self, response_id: str, *, api_key_id: str, timeout: float
    ) -> str | None:
        """The live provider of the key's stored response, or None."""
        async with self._boundary(timeout):
            stored = self._responses.get(response_id)
            if stored is None or stored.expires_at <= self._clock():
                return None
            return stored.provider if stored.api_key_id == api_key_id else None
