"""Keeps this worker's shares of every key's limits in step with the cluster, off the request path.

Every `HEARTBEAT_SECONDS` the worker renews its registration in the store (live for
`WORKER_TTL_SECONDS`), learns how many workers are live, and claims the shares whose demand
changed (see `ShareBook.claims`); a request refused for want of share wakes it sooner. When the
store cannot be reached the worker keeps the shares it last had. Given a `snapshot`, every
heartbeat carries it (see `gateway.operations.cluster_view`) and the worker registers even
when no key has a cluster-wide limit, so every worker's status page can show the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

from affinity_store.store import AffinityStore, StoreError
from gateway.background import stop_task
from gateway.catalog import Key
from gateway.dispatch.key_shares import ShareBook

logger = structlog.get_logger("gateway.dispatch.cluster_shares")

HEARTBEAT_SECONDS = 1.0
WORKER_TTL_SECONDS = 10.0
# A refused request wakes the sync early, but never more often than this.
MIN_WAKE_SECONDS = 0.2
CALL_TIMEOUT_SECONDS = 2.0
# How long a starting worker waits for its first shares before it serves with provisional ones.
START_TIMEOUT_SECONDS = 1.0


def new_worker_id() -> str:
    """A name for this worker process, unique in the cluster (host, pid and a random part)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class ClusterShares:
    """The background sync between a worker's `ShareBook` and the store."""

    def __init__(
        self,
        store: AffinityStore,
        book: ShareBook,
        *,
        keys: Callable[[], Iterable[Key]],
        in_flight: Callable[[str], int],
        worker_id: str | None = None,
        snapshot: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        """`keys` lists the current config's keys; `in_flight` counts a key's requests here;
        `snapshot` describes this worker for its heartbeats."""
        self.store = store
        self.book = book
        self.worker_id = worker_id or new_worker_id()
        self._keys = keys
        self._in_flight = in_flight
        self._snapshot = snapshot
        self._task: asyncio.Task[None] | None = None
        self._last_heartbeat = -float("inf")
        self._registered = False
        self._failing = False

    async def start(self) -> None:
        """Register and claim the first shares (bounded), then keep them in step."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                await self.sync()
        self._task = asyncio.create_task(self._run(), name="key-limit-shares")

    async def stop(self) -> None:
        """Stop the sync and give this worker's shares back at once."""
        await stop_task(self._task)
        self._task = None
        if self._registered:
            with contextlib.suppress(StoreError):
                await self.store.leave(self.worker_id, timeout=CALL_TIMEOUT_SECONDS)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.book.wake.wait(), timeout=HEARTBEAT_SECONDS)
                await asyncio.sleep(MIN_WAKE_SECONDS)
            self.book.wake.clear()
            try:
                await self.sync()
            except Exception:
                logger.exception("key_shares_sync_failed")

    async def sync(self, *, heartbeat: bool = False) -> None:
        """One round: a heartbeat when one is due (or asked for), then the book's claims.

        Without a snapshot to publish, nothing at all while no key has a cluster-wide limit:
        the worker stays unregistered.
        """
        self.book.track(self._keys())
        if self.book.empty and not self._registered and self._snapshot is None:
            return
        try:
            if heartbeat or time.monotonic() - self._last_heartbeat >= HEARTBEAT_SECONDS:
                await self._heartbeat()
            await self._claim()
        except StoreError as error:
            if not self._failing:
                logger.warning(
                    "key_shares_unsynced",
                    error=type(error).__name__,
                    detail="keeping the last known shares of key limits until the store answers",
                )
            self._failing = True
            return
        if self._failing:
            logger.info("key_shares_synced", workers=self.book.workers)
        self._failing = False

    async def _heartbeat(self) -> None:
        started = time.monotonic()
        beat = await self.store.heartbeat(
            self.worker_id,
            ttl_seconds=WORKER_TTL_SECONDS,
            timeout=CALL_TIMEOUT_SECONDS,
            snapshot=None if self._snapshot is None else self._snapshot(),
        )
        self._last_heartbeat = started
        self._registered = True
        if len(beat.workers) != self.book.workers:
            logger.info("cluster_workers", workers=len(beat.workers))
        self.book.workers = max(1, len(beat.workers))
        for (api_key_id, resource), granted in beat.shares.items():
            self.book.granted(api_key_id, resource, granted, None)
        self.book.expired(beat.shares)

    async def _claim(self) -> None:
        for claim in self.book.claims(self._in_flight):
            try:
                grant = await self.store.claim_share(
                    claim.api_key_id,
                    claim.resource,
                    self.worker_id,
                    limit=claim.limit,
                    wanted=claim.wanted,
                    keep=claim.keep,
                    timeout=CALL_TIMEOUT_SECONDS,
                )
            except BaseException:
                self.book.unsettled()
                raise
            self.book.granted(claim.api_key_id, claim.resource, grant.granted, grant.fair)
