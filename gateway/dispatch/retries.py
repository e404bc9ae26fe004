"""Retries: a worker's retry budget, and whether a client is told not to resend.

Failover multiplies load exactly when upstreams are in trouble, so the attempts beyond a
request's first are budgeted, as Envoy's `retry_budget` does: while a worker has N requests in
flight, at most max(`retry_budget_min_concurrent`, `retry_budget_percent` % of N) retries may be
under way at once. A retry is under way from when it is admitted until its provider's answer
begins (a stream's first event, a whole answer) or it fails; a stream a retry found keeps
streaming without holding the budget. A retry the budget refuses is not made: the request
answers with the error its last provider gave.

The first attempt never asks the budget: a request served at once costs it nothing. Nor does a
retry after a connection that was never made (refused, unreachable, timed out connecting): the
request reached no upstream, so sending it to the next adds no load anywhere, and a node that
dies under load must not turn a third of the requests in flight into errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from gateway.config_service import RoutingSettings
from gateway.dispatch.outcomes import Attempt

# Why a retry was not made (the `reason` of gateway_retries_refused_total).
BUDGET = "budget"
REQUEST_SUSPECTED = "request_suspected"

# Outcomes a resend would not repeat against an upstream: a refused connection costs the
# provider nothing, and a 429 cools the provider for as long as it asked (see `health`).
_HARMLESS_TO_RESEND = frozenset({"connect_error", "connect_timeout", "http_429"})
# Outcomes after which the next provider is tried outside the budget: nothing reached an upstream.
_NOTHING_SENT = frozenset({"connect_error", "connect_timeout"})

# What an OpenAI SDK honours before its own retry rules (`x-should-retry: true|false`).
SHOULD_RETRY = "x-should-retry"


def _nothing(*_: str) -> None:
    return None


class RetrySlot:
    """One admitted retry's place in the budget; `release` gives it back (idempotent)."""

    __slots__ = ("_budget",)

    def __init__(self, budget: RetryBudget | None) -> None:
        """A place in `budget`, or (None) a retry that needs none."""
        self._budget = budget

    def release(self) -> None:
        """The retry's answer began, or it failed: it no longer counts against the budget."""
        if self._budget is not None:
            self._budget._active -= 1
            self._budget = None


class RetryBudget:
    """The retries one worker has under way, within a share of its requests in flight.

    `in_flight` tells how many requests the worker has in flight now; `on_retry` and
    `on_refused(reason)` count admitted retries and retries not made.
    """

    def __init__(
        self,
        routing: RoutingSettings,
        in_flight: Callable[[], int],
        *,
        on_retry: Callable[[], None] = _nothing,
        on_refused: Callable[[str], None] = _nothing,
    ) -> None:
        self._in_flight = in_flight
        self._on_retry = on_retry
        self._on_refused = on_refused
        self._active = 0
        self.reconfigure(routing)

    def reconfigure(self, routing: RoutingSettings) -> None:
        """Apply reloaded budget settings; retries under way keep their places."""
        self._share = routing.retry_budget_percent / 100
        self._floor = routing.retry_budget_min_concurrent

    @property
    def active(self) -> int:
        """Retries under way now."""
        return self._active

    def limit(self) -> int:
        """How many retries may be under way at once with the requests in flight now."""
        return max(self._floor, math.floor(self._share * self._in_flight() + 1e-9))

    def try_start(self, after: str | None = None) -> RetrySlot | None:
        """A place for one more retry, or None (counted as a refusal) when the budget is spent;
        a retry `after` a connection never made needs no place (it is counted as a retry)."""
        if after in _NOTHING_SENT:
            self._on_retry()
            return RetrySlot(None)
        if self._active >= self.limit():
            self._on_refused(BUDGET)
            return None
        self._active += 1
        self._on_retry()
        return RetrySlot(self)

    def forgo(self, reason: str) -> None:
        """Count a retry not made for another reason (the request itself is the suspect)."""
        self._on_refused(reason)


def resend_is_futile(attempts: Sequence[Attempt]) -> bool:
    """Whether a client that resends a request every candidate failed (or that failed as the
    common factor) would only make the upstreams fail it again: True unless each attempt was a
    connection never made or a 429 (both cost the upstreams nothing when repeated later)."""
    return any(attempt.outcome not in _HARMLESS_TO_RESEND for attempt in attempts)
