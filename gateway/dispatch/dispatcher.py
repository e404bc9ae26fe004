"""The failover loop: a request tried at the providers of its failover list in order, a retry
only before the first byte reaches the client and within the worker's retry budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web

from gateway.catalog import Provider
from gateway.config_service import RoutingSettings
from gateway.dispatch.attempt import Attempts
from gateway.dispatch.blame import RequestBlame
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.job import DispatchRecord, DispatchRequest
from gateway.dispatch.outcomes import RetryableAttemptError, exhausted, relayed
from gateway.dispatch.permits import ProviderPermits
from gateway.dispatch.retries import (
    BUDGET,
    REQUEST_SUSPECTED,
    SHOULD_RETRY,
    RetryBudget,
    RetrySlot,
    resend_is_futile,
)
from gateway.dispatch.upstream_pool import UpstreamPool
from gateway.dispatch.whole_relay import MAX_RESPONSE_BYTES
from gateway.shared.errors import GatewayError, let_go


class Dispatcher:
    """Sends a request to the providers of a failover list in order, within a budget."""

    def __init__(
        self,
        client: UpstreamPool,
        health: ProviderHealth,
        permits: ProviderPermits,
        routing: RoutingSettings,
        retries: RetryBudget,
        *,
        dropped_headers: frozenset[str],
        on_cooldown: Callable[[str], None],
        max_first_event_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._attempts = Attempts(
            client,
            health,
            dropped_headers=dropped_headers,
            max_first_event_bytes=max_first_event_bytes,
            write_timeout=routing.downstream_write_timeout_seconds,
        )
        self._on_cooldown = on_cooldown
        self._health = health
        self._permits = permits
        self._failover_budget = routing.failover_budget
        self._retries = retries
        self._wait_timeout = routing.wait_timeout_seconds

    async def dispatch(
        self,
        request: web.Request,
        job: DispatchRequest,
        providers: Sequence[Provider],
        record: DispatchRecord,
    ) -> web.StreamResponse:
        """Answer the client from the first provider that works; raise GatewayError if none does.

        Cooling providers are skipped; each attempt takes a permit on the first provider left
        in the list that has one free, or waits in line for any of them. What a failed attempt
        teaches the providers' health is decided with the request's other attempts in view.

        An attempt after the first is a retry: made only within the worker's retry budget, and
        not at all once the request itself is the suspect (two providers failed it alike). When
        every candidate failed, or the request is the suspect, the error says
        `x-should-retry: false`, unless it says when to come back (`Retry-After`) or a resend
        would cost the upstreams nothing.
        """
        remaining = [provider for provider in providers if not self._health.cooling(provider.name)]
        if not remaining:
            raise GatewayError(
                429,
                "Every provider for this model is cooling down after failures or rate limits.",
                "providers_cooling",
                retry_after=self._health.soonest_recovery(provider.name for provider in providers),
            )
        blame = RequestBlame(self._health, job.key_id, self._on_cooldown)
        try:
            # A plain loop: a failed attempt is a RetryableAttemptError, the budget caps the
            # attempts, and nothing waits between them (a framework's per-attempt state costs
            # more than the whole rule).
            for _ in range(min(self._failover_budget, len(remaining))):
                retry: RetrySlot | None = None
                if record.attempts:
                    retry = self._retry(job, blame, record)
                    if retry is None:
                        break
                try:
                    provider = await self._take_permit(remaining)
                    remaining.remove(provider)
                    try:
                        return await self._attempts.make(
                            request, job, provider, record, blame, retry=retry
                        )
                    except RetryableAttemptError as failure:
                        let_go(failure)  # its frames would keep this request's objects alive
                        continue
                    finally:
                        self._permits.release(provider.name)
                finally:
                    if retry is not None:
                        retry.release()
        finally:
            blame.settle()
        error = relayed(exhausted(record.attempts), record.attempts, record.upstream_answer)
        tried = not remaining or blame.request_suspected
        if tried and error.retry_after is None and resend_is_futile(record.attempts):
            # The gateway already did what a client's resend would: the OpenAI SDKs obey this.
            error.headers[SHOULD_RETRY] = "false"
        raise error

    def _retry(
        self, job: DispatchRequest, blame: RequestBlame, record: DispatchRecord
    ) -> RetrySlot | None:
        """A place in the retry budget for the request's next attempt, or None: no retry."""
        if not job.replayable():
            # A streamed upload past its kept copy cannot be sent again.
            return None
        if blame.request_suspected:
            self._retries.forgo(REQUEST_SUSPECTED)
            record.failover_stopped = REQUEST_SUSPECTED
            return None
        retry = self._retries.try_start(after=record.attempts[-1].outcome)
        if retry is None:
            record.failover_stopped = BUDGET
        return retry

    async def _take_permit(self, remaining: list[Provider]) -> Provider:
        """The first provider with a free permit (waiting in line if needed), paced."""
        name = await self._permits.acquire_first(
            [provider.name for provider in remaining], self._wait_timeout
        )
        if name is None:
            raise GatewayError(
                503,
                "Every provider for this model is at its concurrency limit; try again shortly.",
                "providers_busy",
                retry_after=1,
            )
        provider = next(provider for provider in remaining if provider.name == name)
        try:
            await self._permits.pace(name)
        except BaseException:
            self._permits.release(name)
            raise
        return provider
