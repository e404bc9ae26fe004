"""`BindingChanges`: every write of a binding, from any process, heard through LISTEN/NOTIFY.

Each statement that sets a binding's provider (claim, rebind) notifies the channel at commit.
A gateway that hears every change can trust its local copy of a binding until told otherwise,
instead of re-reading it every few seconds. That trust is only as good as the listening
connection, so the listener proves itself: it pings the channel through the writers' own pool
(through PgBouncer, when there is one) and counts as *verified* only while its pings come back.
Whenever it stops being verified, or becomes verified again, its `generation` moves on, so a
cache can tell which of its entries were covered by an unbroken stream of notifications.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from affinity_store.driver_errors import translated_driver_errors
from affinity_store.postgres import Pool
from affinity_store.queries import load_queries
from affinity_store.store import StoreError
from gateway.shared.background import Backoff, keep_retrying, stop_task

logger = structlog.get_logger("affinity_store.notifications")

CHANNEL = "affinity_binding_changed"
PING_PREFIX = "ping:"
PING_INTERVAL_SECONDS = 10.0
PING_TIMEOUT_SECONDS = 2.0
RECONNECT_BACKOFF = Backoff((0.5, 1.0, 2.0, 5.0, 10.0))
CONNECT_TIMEOUT_SECONDS = 5.0

OnChange = Callable[[str, str], None]


class BindingChanges:
    """Listens on a direct connection to `url`; pings through `pool`; calls `on_change`."""

    def __init__(self, url: str, pool: Pool, on_change: OnChange) -> None:
        self._url = url
        self._pool = pool
        self._on_change = on_change
        self._notify = load_queries().notify_binding_channel
        self._connection: asyncpg.Connection[asyncpg.Record] | None = None
        self._pending_ping: tuple[str, asyncio.Future[None]] | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.verified = False
        self.generation = 0
        self.changes_heard = 0

    async def start(self) -> None:
        """Connect and verify once (so a worker starts trusting its cache at once), then keep
        the listener alive in the background."""
        with contextlib.suppress(StoreError, TimeoutError):
            await self._connect()
            await self._ping()
        self._task = asyncio.create_task(self._run(), name="binding-changes")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        await stop_task(self._task)
        self._task = None
        await self._close()
        self._set_verified(False)

    async def _run(self) -> None:
        """Keep listening; after a failed round, reconnect following RECONNECT_BACKOFF."""
        await keep_retrying(
            "binding-changes",
            self._listen,
            retry_on=(StoreError, TimeoutError),
            backoff=RECONNECT_BACKOFF,
        )

    async def _listen(self) -> None:
        """One round: connect if need be, prove the channel with a ping, then wait for the next
        ping or a lost connection. A failure leaves the listener unverified and disconnected."""
        try:
            if self._connection is None or self._connection.is_closed():
                await self._connect()
            await self._ping()
            self._lost.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), PING_INTERVAL_SECONDS)
        except (StoreError, TimeoutError) as error:
            if self.verified:
                logger.warning(
                    "binding_notifications_lost",
                    error=type(error).__name__,
                    detail="local binding copies expire after local_cache_seconds again",
                )
            self._set_verified(False)
            await self._close()
            raise

    async def _connect(self) -> None:
        with translated_driver_errors(CONNECT_TIMEOUT_SECONDS):
            connection = await asyncpg.connect(
                self._url,
                timeout=CONNECT_TIMEOUT_SECONDS,
                statement_cache_size=0,
                server_settings={"application_name": "affinity-gateway-listener"},
            )
            await connection.add_listener(CHANNEL, self._heard)
        connection.add_termination_listener(self._terminated)
        self._connection = connection

    async def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CONNECT_TIMEOUT_SECONDS)

    async def _ping(self) -> None:
        """Send a ping through the pool and wait for it here; raise when it does not come."""
        token = PING_PREFIX + secrets.token_hex(8)
        arrived: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_ping = (token, arrived)
        try:
            with translated_driver_errors(PING_TIMEOUT_SECONDS):
                async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                    async with self._pool.acquire() as connection:
                        await connection.execute(self._notify, token)
                    await arrived
        finally:
            self._pending_ping = None
        self._set_verified(True)

    def _heard(
        self,
        connection: asyncpg.Connection[Any] | PoolConnectionProxy[Any],
        pid: int,
        channel: str,
        payload: object,
    ) -> None:
        pending = self._pending_ping
        if not isinstance(payload, str):
            return
        if payload.startswith(PING_PREFIX):
            if pending is not None and pending[0] == payload and not pending[1].done():
                pending[1].set_result(None)
            return
        api_key_id, _, model = payload.partition("\n")
        self.changes_heard += 1
        self._on_change(api_key_id, model)

    def _terminated(self, connection: object) -> None:
        self._set_verified(False)
        self._lost.set()

    def _set_verified(self, verified: bool) -> None:
        if verified != self.verified:
            self.verified = verified
            self.generation += 1
            if verified:
                logger.info("binding_notifications_verified")
