"""Renewals and rebinds: what a served request asks of its binding, sent in the background.

A success on the bound provider renews the binding once it has less than half its TTL left; a
success elsewhere moves the binding there (this process follows the new provider at once). Both
wait in a bounded queue (dropped and counted when it is full or the store is down); one worker
sends the renewals of each moment in one statement, then the rebinds one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from affinity_store.store import AffinityStore, Candidate, Renewal, StoreError
from gateway.config_service import AffinitySettings
from gateway.selection.local_copies import CachedBinding, LocalCopies
from gateway.selection.store_calls import StoreCalls
from gateway.shared.metrics import Metrics

RENEW_BATCH_SIZE = 500
RENEW_LINGER_SECONDS = 1.0


@dataclass(frozen=True)
class _Renewal:
    """A binding to extend if it still names `provider`."""

    api_key_id: str
    model: str
    provider: str


@dataclass(frozen=True)
class _Rebind:
    """A binding to move from `old_provider` to `new` (or create, if it is gone)."""

    api_key_id: str
    model: str
    old_provider: str
    new: Candidate


class Renewals:
    """The queue of renewals and rebinds, and the worker that sends them (see `run`)."""

    def __init__(
        self,
        store: AffinityStore,
        calls: StoreCalls,
        copies: LocalCopies,
        settings: AffinitySettings,
        metrics: Metrics,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        """Queue at most `settings.renew_queue_size` items; `sleep` paces the worker."""
        self._store = store
        self._calls = calls
        self._copies = copies
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        self._sleep = sleep
        self._queue: asyncio.Queue[_Renewal | _Rebind] = asyncio.Queue(settings.renew_queue_size)

    def served(
        self,
        api_key_id: str,
        model: str,
        *,
        bound: CachedBinding | None,
        served: Candidate,
    ) -> bool:
        """Queue the renewal or rebind a success calls for; True when it was a rebind."""
        if bound is None:
            return False
        if served.provider == bound.provider:
            remaining = bound.expires_at - self._clock()
            if remaining < self._settings.ttl_seconds / 2 and not bound.renewal_queued:
                bound.renewal_queued = self._enqueue(_Renewal(api_key_id, model, served.provider))
            return False
        # Until the rebind lands, this process already follows the provider that served.
        now = self._clock()
        self._copies.put(
            (api_key_id, model),
            CachedBinding(
                served.provider, served.routing_identity, now, now + self._settings.ttl_seconds
            ),
        )
        self._enqueue(_Rebind(api_key_id, model, bound.provider, served))
        return True

    def _enqueue(self, item: _Renewal | _Rebind) -> bool:
        """Queue `item`; False (counted as a drop) when the queue is full."""
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self._metrics.renew_drops.labels("queue_full").inc()
            return False
        self._metrics.renew_queue_depth.set(self._queue.qsize())
        return True

    async def run(self) -> None:
        """Forever: gather what is queued for a moment, then send it (nothing while the
        store's breaker is open: those items are dropped and counted)."""
        while True:
            batch = [await self._queue.get()]
            # Renewals are due with half a TTL to spare: gather them for a moment, so a busy
            # worker sends at most one renewal statement per RENEW_LINGER_SECONDS.
            await self._sleep(RENEW_LINGER_SECONDS)
            while len(batch) < RENEW_BATCH_SIZE and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._metrics.renew_queue_depth.set(self._queue.qsize())
            if not self._calls.breaker.allow():
                self._metrics.renew_drops.labels("store_down").inc(len(batch))
                continue
            with contextlib.suppress(StoreError):
                await self._renew([item for item in batch if isinstance(item, _Renewal)])
            for item in batch:
                if isinstance(item, _Rebind):
                    with contextlib.suppress(StoreError):
                        await self._rebind(item)

    async def _renew(self, renewals: list[_Renewal]) -> None:
        """Renew a batch in one statement; forget local copies whose binding is gone."""
        if not renewals:
            return
        ttl = self._settings.ttl_seconds
        renewed = await self._calls.call(
            "renew",
            lambda limit: self._store.renew_many(
                [Renewal(item.api_key_id, item.model, item.provider) for item in renewals],
                ttl_seconds=ttl,
                timeout=limit,
            ),
        )
        now = self._clock()
        for item in renewals:
            key = (item.api_key_id, item.model)
            entry = self._copies.held(key)
            if entry is None or entry.provider != item.provider:
                continue
            if key in renewed:
                entry.expires_at = now + ttl
                entry.renewal_queued = False
            else:  # purged, or moved by another process: read it again next time
                self._copies.forget(key)

    async def _rebind(self, item: _Rebind) -> None:
        """Move the binding to the provider that served, unless another process moved it."""
        await self._calls.call(
            "rebind",
            lambda limit: self._store.rebind(
                item.api_key_id,
                item.model,
                old_provider=item.old_provider,
                new=item.new,
                ttl_seconds=self._settings.ttl_seconds,
                timeout=limit,
            ),
        )
