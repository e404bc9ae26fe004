"""Keeps this worker's shares of every key's limits in step with the cluster.

Off the request path, every `HEARTBEAT_SECONDS` the worker renews its registration in the store
(live for `WORKER_TTL_SECONDS`), learns how many workers are live, and claims the shares whose
demand changed (see `ShareBook.claims`); a request refused for want of share wakes it sooner.
When the store cannot be reached the worker keeps the shares it last had, until its registration
would have expired: then it drops its concurrency grants (the store may give them to others).
Given a `snapshot`, every heartbeat carries it (see `gateway.operations.cluster_view`) and the
worker registers even when no key has a cluster-wide limit, so every worker's status page can
show the cluster.

On the request path, only when a request finds its key's concurrency share spent: one store
statement asks for one more unit (`claim_unit`), within the claim deadline, and units beyond
what the worker holds for its next requests go back as soon as they are idle (`give_back`).
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
from gateway.catalog import Key
from gateway.dispatch.key_shares import CONCURRENCY, ShareBook, Unit
from gateway.shared.background import every, stop_task

logger = structlog.get_logger("gateway.dispatch.cluster_shares")

HEARTBEAT_SECONDS = 1.0
WORKER_TTL_SECONDS = 10.0
# A refused request wakes the sync early, but never more often than this.
MIN_WAKE_SECONDS = 0.2
CALL_TIMEOUT_SECONDS = 2.0
# How long a starting worker waits for its first shares before it serves with provisional ones.
START_TIMEOUT_SECONDS = 1.0
# A worker stops using its grants this long before the store could expire its registration.
LAPSE_MARGIN_SECONDS = 0.5
# The request path's unit claim, when nothing else is given.
UNIT_TIMEOUT_SECONDS = 0.5


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
        unit_timeout: float = UNIT_TIMEOUT_SECONDS,
        on_unit: Callable[[Unit, float], None] | None = None,
    ) -> None:
        """`keys` lists the current config's keys; `in_flight` counts a key's requests here;
        `snapshot` describes this worker for its heartbeats; `on_unit` hears each unit claim's
        outcome and seconds taken."""
        self.store = store
        self.book = book
        self.worker_id = worker_id or new_worker_id()
        self._keys = keys
        self._in_flight = in_flight
        self._snapshot = snapshot
        self._unit_timeout = unit_timeout
        self._on_unit = on_unit
        self._returns: set[asyncio.Task[None]] = set()
        self._lapses_seen = 0
        self._units_failing = False
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
        for task in list(self._returns):
            await stop_task(task)
        if self._registered:
            with contextlib.suppress(StoreError):
                await self.store.leave(self.worker_id, timeout=CALL_TIMEOUT_SECONDS)

    async def _run(self) -> None:
        """A sync every heartbeat, or sooner once the book asks for one."""
        await every(
            "key-limit-shares",
            self.sync,
            interval=HEARTBEAT_SECONDS,
            wait_first=True,
            sleep=self._until_due,
        )

    async def _until_due(self, heartbeat: float) -> None:
        """Wait for the next heartbeat, or for the book's wake-up and a moment more (so one
        sync takes what a burst of requests asked for)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.book.wake.wait(), timeout=heartbeat)
            await asyncio.sleep(MIN_WAKE_SECONDS)
        self.book.wake.clear()

    async def sync(self, *, heartbeat: bool = False) -> None:
        """One round: a heartbeat when one is due (or asked for), then the book's claims.

        Without a snapshot to publish, nothing at all while no key has a cluster-wide limit:
        the worker stays unregistered.
        """
        self.book.track(self._keys())
        if self.book.empty and not self._registered and self._snapshot is None:
            return
        try:
            if heartbeat or self.book.now() - self._last_heartbeat >= HEARTBEAT_SECONDS:
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
        started = self.book.now()
        self.book.lapsed()
        lapsed = self.book.lapses > self._lapses_seen
        self._lapses_seen = self.book.lapses
        beat = await self.store.heartbeat(
            self.worker_id,
            ttl_seconds=WORKER_TTL_SECONDS,
            timeout=CALL_TIMEOUT_SECONDS,
            snapshot=None if self._snapshot is None else self._snapshot(),
        )
        self._last_heartbeat = started
        self._registered = True
        dropped = self.book.standing(beat.shares)
        # Set after the grants were checked against the store: a lapse dropped them first.
        self.book.valid_until = started + WORKER_TTL_SECONDS - LAPSE_MARGIN_SECONDS
        if lapsed or dropped:
            logger.warning(
                "key_shares_lapsed",
                detail="this worker's registration expired: its grants were dropped and are "
                "claimed afresh",
            )
        if len(beat.workers) != self.book.workers:
            logger.info("cluster_workers", workers=len(beat.workers))
        self.book.workers = max(1, len(beat.workers))

    async def _claim(self) -> None:
        for claim in self.book.claims(self._in_flight):
            async with self.book.lock(claim.api_key_id, claim.resource):
                keep = claim.keep
                if claim.resource == CONCURRENCY:
                    # A unit claim may have admitted more since the claim was drawn up.
                    keep = max(keep, self._in_flight(claim.api_key_id))
                    self.book.limit_to(claim.api_key_id, claim.resource, keep)
                try:
                    grant = await self.store.claim_share(
                        claim.api_key_id,
                        claim.resource,
                        self.worker_id,
                        limit=claim.limit,
                        wanted=claim.wanted,
                        keep=keep,
                        timeout=CALL_TIMEOUT_SECONDS,
                    )
                except BaseException:
                    self.book.unsettled()
                    raise
                self.book.granted(
                    claim.api_key_id, claim.resource, grant.granted, grant.fair, claim.wanted
                )

    async def claim_unit(self, key: Key, in_flight: Callable[[], int]) -> Unit:
        """Ask the store for one more unit of the key's `max_concurrency` than the worker has in
        flight (`in_flight`), within the unit deadline; on GRANTED the caller admits at once."""
        assert key.max_concurrency is not None
        started = time.monotonic()
        arrived = self.book.now()
        outcome = Unit.NO_ANSWER
        try:
            async with asyncio.timeout(self._unit_timeout):
                async with self.book.lock(key.id, CONCURRENCY):
                    outcome = await self._claim_unit(key, in_flight(), started, arrived)
        except TimeoutError:
            pass
        except StoreError as error:
            self.book.wake.set()  # a lapsed registration: heartbeat soon
            if not self._units_failing:
                logger.warning(
                    "key_units_unanswered",
                    error=type(error).__name__,
                    detail="requests past a key's concurrency share here get 503 until the "
                    "store answers",
                )
            self._units_failing = True
        else:
            if self._units_failing and outcome is not Unit.NO_ANSWER:
                logger.info("key_units_answered")
                self._units_failing = False
        if self._on_unit is not None:
            self._on_unit(outcome, time.monotonic() - started)
        return outcome

    async def _claim_unit(self, key: Key, busy: int, started: float, arrived: float) -> Unit:
        """Under the share's lock: the unit, unless room appeared meanwhile, or the answer of a
        claim sent after this request arrived (a flood queued here costs one store call)."""
        assert key.max_concurrency is not None
        if busy < (self.book.concurrency(key) or 0):
            return Unit.GRANTED  # a give-back or claim ahead of this one left room
        if not self.book.registered:
            self.book.wake.set()
            return Unit.NO_ANSWER
        full_since = self.book.full_since(key.id)
        if full_since is not None and arrived <= full_since:
            return Unit.AT_LIMIT
        sent = self.book.now()
        remaining = self._unit_timeout - (time.monotonic() - started)
        answer = await self.store.claim_unit(
            key.id,
            CONCURRENCY,
            self.worker_id,
            limit=key.max_concurrency,
            needed=busy + 1,
            timeout=max(remaining, 0.001),
        )
        self.book.unit(key.id, answer.granted, full_since=None if answer.admitted else sent)
        return Unit.GRANTED if answer.admitted else Unit.AT_LIMIT

    def give_back(self, api_key_id: str) -> None:
        """Return the key's idle units beyond what this worker holds, in the background."""
        task = asyncio.create_task(self._give_back(api_key_id), name="key-units-give-back")
        self._returns.add(task)
        task.add_done_callback(self._returns.discard)

    async def _give_back(self, api_key_id: str) -> None:
        try:
            while True:
                async with self.book.lock(api_key_id, CONCURRENCY):
                    keep = self.book.give_back(api_key_id, self._in_flight(api_key_id))
                    if keep is None:
                        return
                    await self.store.release_units(
                        api_key_id,
                        CONCURRENCY,
                        self.worker_id,
                        keep=keep,
                        timeout=CALL_TIMEOUT_SECONDS,
                    )
        except StoreError as error:
            logger.info("key_units_not_returned", error=type(error).__name__)
            self.book.unsynced(api_key_id, CONCURRENCY)
