"""The janitor: every interval, one purge of bindings expired beyond the grace period."""

from __future__ import annotations

import contextlib

import structlog

from affinity_store.store import AffinityStore, StoreError
from gateway.config_service import AffinitySettings
from gateway.selection.store_calls import StoreCalls
from gateway.shared.background import every

logger = structlog.get_logger("gateway.selection.affinity")

JANITOR_BATCH_SIZE = 1000


class Janitor:
    """Purges long-expired bindings in batches; the store lets one janitor at a time do it."""

    def __init__(self, store: AffinityStore, calls: StoreCalls, settings: AffinitySettings) -> None:
        """Purge every `janitor_interval_seconds` what expired `janitor_grace_seconds` ago."""
        self._store = store
        self._calls = calls
        self._settings = settings

    async def run(self) -> None:
        """A purge every janitor interval, the first one interval after the start."""
        await every(
            "affinity-janitor",
            self.purge_expired,
            interval=self._settings.janitor_interval_seconds,
            wait_first=True,
        )

    async def purge_expired(self) -> None:
        """One janitor round (none while the store's breaker is open); logs what it deleted."""
        if self._calls.breaker.allow():
            with contextlib.suppress(StoreError):
                deleted = await self._calls.call(
                    "purge",
                    lambda limit: self._store.purge_expired(
                        grace_seconds=self._settings.janitor_grace_seconds,
                        batch_size=JANITOR_BATCH_SIZE,
                        timeout=limit,
                    ),
                )
                if deleted:
                    logger.info("janitor_purged", rows=deleted)
