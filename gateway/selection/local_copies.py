"""This process's copies of shared bindings, and when the change feed lets them be trusted.

A copy is right while it is live and younger than `local_cache_seconds`; a copy read while the
change feed heard every change is right until a change to it is heard, whatever its age (the
renewals keep its binding alive in the store).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from affinity_store.store import Binding
from gateway.config_service import AffinitySettings
from gateway.selection.binding_cache import BindingCache

LOCAL_CACHE_CAPACITY = 250_000
# One key's share of the local copies: an application key with a binding per conversation
# cannot push every other key's copies out (a fifth of them always stays for the others).
LOCAL_CACHE_PER_KEY = 200_000


@dataclass(slots=True)
class CachedBinding:
    """A binding as this process last saw it, with its expiry on this process's clock."""

    provider: str
    routing_identity: str
    cached_at: float
    expires_at: float
    renewal_queued: bool = False
    generation: int | None = None  # the change feed's generation it is covered by, if any


class ChangeFeed(Protocol):
    """Notifications of binding changes from every process (see affinity_store.notifications)."""

    @property
    def verified(self) -> bool:
        """Whether every change is being heard right now."""
        ...

    @property
    def generation(self) -> int:
        """Moves on whenever `verified` changes."""
        ...

    @property
    def changes_heard(self) -> int:
        """How many changes have been heard so far."""
        ...


class LocalCopies:
    """`(key id, model) → CachedBinding`, bounded (see `BindingCache`), vouched for by a feed."""

    def __init__(self, settings: AffinitySettings, clock: Callable[[], float]) -> None:
        """Copies age by `clock`; `settings.local_cache_seconds` 0 trusts no copy to the feed."""
        self._settings = settings
        self._clock = clock
        self._cache: BindingCache[CachedBinding] = BindingCache(
            LOCAL_CACHE_CAPACITY, LOCAL_CACHE_PER_KEY
        )
        self._feed: ChangeFeed | None = None

    def follow(self, feed: ChangeFeed) -> None:
        """Trust copies for as long as `feed` hears every change."""
        self._feed = feed

    def vouching_generation(self) -> int | None:
        """The change feed's generation while it vouches for local copies, else None."""
        feed = self._feed
        if feed is None or not feed.verified or self._settings.local_cache_seconds <= 0:
            return None  # local_cache_seconds 0: always ask the store
        return feed.generation

    def changes_heard(self) -> int:
        """How many changes the feed has heard (-1 without a feed): compare before and after
        a read to tell whether a change arrived meanwhile."""
        return -1 if self._feed is None else self._feed.changes_heard

    def _covered(self, entry: CachedBinding) -> bool:
        """Whether every change since `entry` was read has been heard (so it is still right)."""
        return entry.generation is not None and entry.generation == self.vouching_generation()

    def get(self, key: tuple[str, str], *, fresh: bool) -> CachedBinding | None:
        """The copy if it can be trusted: covered by the feed, or else live (and with `fresh`
        younger than `local_cache_seconds`); an expired copy is dropped."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        if self._covered(entry):
            return entry
        now = self._clock()
        if now >= entry.expires_at:
            self._cache.pop(key)
            return None
        if fresh and now - entry.cached_at > self._settings.local_cache_seconds:
            return None
        return entry

    def held(self, key: tuple[str, str]) -> CachedBinding | None:
        """The copy as it is held, whatever its age or coverage."""
        return self._cache.get(key)

    def remember(self, binding: Binding, heard: int) -> CachedBinding:
        """Copy a binding read when `heard` changes had been heard; a change heard while it
        was being read may be newer than it, so then it is not covered by the feed."""
        now = self._clock()
        entry = CachedBinding(
            binding.provider,
            binding.routing_identity,
            now,
            now + binding.ttl_remaining,
            generation=self.vouching_generation() if heard == self.changes_heard() else None,
        )
        self._cache.put((binding.api_key_id, binding.model), entry)
        return entry

    def put(self, key: tuple[str, str], entry: CachedBinding) -> None:
        """Hold `entry` as the copy of `key` (covered by no feed generation unless it says so)."""
        self._cache.put(key, entry)

    def forget(self, key: tuple[str, str]) -> None:
        """Drop the copy of `key`, if any: the next look-up reads the store."""
        self._cache.pop(key)
