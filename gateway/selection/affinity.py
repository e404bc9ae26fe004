"""Shared affinity, the gateway's side: look-ups and claims, never slowed by a sick store.

A look-up is answered from this process's copy when it can be trusted (`local_copies`), else by
one lock-free read; a miss claims. Concurrent look-ups or claims of one (key, model) share one
call (`single_flight`); every call goes through `store_calls` (connections, deadlines, breaker).
When the store cannot be asked the answer is degraded, never an error. Around them run the
renewals (`renewals`) and the janitor (`janitor`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from affinity_store.store import AffinityStore, Candidate, Spread, StoreError
from gateway.config_service import AffinitySettings
from gateway.selection.janitor import Janitor
from gateway.selection.local_copies import CachedBinding, ChangeFeed, LocalCopies
from gateway.selection.renewals import Renewals
from gateway.selection.single_flight import SingleFlight
from gateway.selection.store_calls import StoreCalls
from gateway.shared.background import stop_task
from gateway.shared.metrics import Metrics

# A claim keeps the agreed provider while it holds at most this many more bindings than the
# least-bound candidate (or `agreement_slack` of that count, whichever is larger).
AGREEMENT_MIN_BINDINGS = 2


@dataclass(frozen=True)
class Lookup:
    """The outcome of asking for a binding: the binding, or none, or the store was skipped."""

    binding: CachedBinding | None
    degraded: bool = False


class SharedAffinity:
    """Bindings shared through the store, never on the critical path when the store is sick."""

    def __init__(
        self,
        store: AffinityStore,
        settings: AffinitySettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        connections: int | None = None,
    ) -> None:
        """`connections` is the store's pool size: at most that many calls are made at once."""
        self.store = store
        self._settings = settings
        self._metrics = metrics
        self._calls = StoreCalls(store, settings, metrics, clock=clock, connections=connections)
        self.breaker = self._calls.breaker
        self._copies = LocalCopies(settings, clock)
        self._renewals = Renewals(
            store, self._calls, self._copies, settings, metrics, clock=clock, sleep=sleep
        )
        self._janitor = Janitor(store, self._calls, settings)
        self._lookups: SingleFlight[Lookup] = SingleFlight()
        self._claims: SingleFlight[Lookup] = SingleFlight()
        self._tasks: list[asyncio.Task[None]] = []
        self._spread = Spread(share=settings.agreement_slack, minimum=AGREEMENT_MIN_BINDINGS)
        self._metrics.store_up.set(1)

    def follow(self, feed: ChangeFeed) -> None:
        """Trust local copies for as long as `feed` hears every change (it calls `changed`)."""
        self._copies.follow(feed)

    def changed(self, api_key_id: str, model: str) -> None:
        """Some process changed this binding: forget the local copy."""
        self._copies.forget((api_key_id, model))

    def publish_gauges(self) -> None:
        """Mirror whether copies of bindings are covered by the change feed into its gauge."""
        verified = self._copies.vouching_generation() is not None
        self._metrics.change_feed_verified.set(1 if verified else 0)

    async def start(self) -> None:
        """Measure the store's pace, then start the renewal worker and the janitor."""
        await self._calls.probe()
        self._tasks = [
            asyncio.create_task(self._renewals.run(), name="affinity-renewals"),
            asyncio.create_task(self._janitor.run(), name="affinity-janitor"),
        ]

    async def stop(self) -> None:
        """Cancel the background tasks and wait for them."""
        for task in self._tasks:
            await stop_task(task)
        self._tasks = []

    def cached(self, api_key_id: str, model: str, *, fresh: bool = True) -> CachedBinding | None:
        """The local copy of a binding (no I/O).

        A copy covered by the change feed is right until a change is heard, whatever its age
        (renewals keep it alive in the store). Otherwise it must be live, and with `fresh` also
        younger than `local_cache_seconds`.
        """
        return self._copies.get((api_key_id, model), fresh=fresh)

    async def lookup(self, api_key_id: str, model: str) -> Lookup:
        """The live binding: from the local cache, else one lock-free read under its deadline.

        Concurrent look-ups of one (key, model) in this process share one read. When the store
        cannot be asked, the result is degraded and carries the last binding this process saw,
        if it has not expired: local state is still the best guess.
        """
        entry = self._copies.get((api_key_id, model), fresh=True)
        if entry is not None:
            return Lookup(entry)
        return await self._lookups.run((api_key_id, model), lambda: self._lookup(api_key_id, model))

    async def _lookup(self, api_key_id: str, model: str) -> Lookup:
        """One read of the store (or a degraded answer from the local copy)."""
        if not self.breaker.allow():
            return Lookup(self.cached(api_key_id, model, fresh=False), degraded=True)
        heard = self._copies.changes_heard()
        try:
            binding = await self._calls.call(
                "lookup",
                lambda limit: self.store.lookup(api_key_id, model, timeout=limit),
            )
        except StoreError:
            return Lookup(self.cached(api_key_id, model, fresh=False), degraded=True)
        if binding is None:
            self._copies.forget((api_key_id, model))
            return Lookup(None)
        return Lookup(self._copies.remember(binding, heard))

    async def claim(
        self,
        api_key_id: str,
        model: str,
        *,
        preferred: Sequence[Candidate],
        acceptable: Collection[str],
        weights: Mapping[str, float] | None = None,
        group: str | None = None,
    ) -> Lookup:
        """Bind on a miss; concurrent misses for one (key, model) here share one claim.

        `weights` (capacity per routing identity) and `group` shape the claim's spread (see
        `Spread`)."""
        spread = self._spread
        if weights or group is not None:
            spread = dataclasses.replace(spread, weights=weights or {}, group=group)
        return await self._claims.run(
            (api_key_id, model),
            lambda: self._claim(api_key_id, model, preferred, acceptable, spread),
        )

    async def _claim(
        self,
        api_key_id: str,
        model: str,
        preferred: Sequence[Candidate],
        acceptable: Collection[str],
        spread: Spread,
    ) -> Lookup:
        """One claim in the store (degraded, with no binding, when it cannot be asked)."""
        if not self.breaker.allow():
            return Lookup(None, degraded=True)
        heard = self._copies.changes_heard()
        try:
            binding = await self._calls.call(
                "claim",
                lambda limit: self.store.claim(
                    api_key_id,
                    model,
                    acceptable=acceptable,
                    preferred=preferred,
                    ttl_seconds=self._settings.ttl_seconds,
                    timeout=limit,
                    spread=spread,
                ),
            )
        except StoreError:
            return Lookup(None, degraded=True)
        return Lookup(self._copies.remember(binding, heard))

    def served(
        self,
        api_key_id: str,
        model: str,
        *,
        bound: CachedBinding | None,
        served: Candidate,
    ) -> bool:
        """Queue the renewal or rebind a success calls for; True when it was a rebind."""
        return self._renewals.served(api_key_id, model, bound=bound, served=served)
