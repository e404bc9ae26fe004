"""Whose fault a failed attempt is: the provider's, or possibly the request's own.

Like a proxy's outlier detection, the gateway cools a provider only for what the provider did:

- unreachable (the connection could not be made): always counts;
- 429: the provider's own instruction to wait, honoured as asked;
- a provider fault no request can cause (503, a malformed or broken answer): counts;
- a failure the request itself may have caused (another 5xx, 408, a refused provider
  credential, a redirect, a timeout after the upstream accepted the request): counts with the
  request's key, and only after the same request's other attempts have had their say. If another
  provider answered the same request with an error too, the request is the common factor and
  none of these count (and dispatch tries no further provider: a third would only fail it the
  same way); if no other provider answered it, or one answered 2xx, they count.

`ProviderHealth` then needs two keys in a run before key-attributed failures cool a provider.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.outcomes import RetryableAttemptError

# Answers that describe the provider's state, never the request's content.
PROVIDER_FAULT_STATUSES = frozenset({503})
PROVIDER_FAULT_REASONS = frozenset({"invalid_response", "payload_error", "dropped_mid_stream"})
UNREACHABLE_REASONS = frozenset({"connect_timeout"})


class Fault(enum.Enum):
    """Who is to blame for a failed attempt."""

    UNREACHABLE = "unreachable"
    RATE_LIMITED = "rate_limited"
    PROVIDER = "provider"
    REQUEST_OR_PROVIDER = "request_or_provider"


def fault_of(failure: RetryableAttemptError, *, connected: bool = True) -> Fault:
    """Classify a failed attempt; `connected` is False when no connection could be made."""
    if not connected or failure.reason in UNREACHABLE_REASONS:
        return Fault.UNREACHABLE
    if failure.status == 429:
        return Fault.RATE_LIMITED
    if failure.status in PROVIDER_FAULT_STATUSES or failure.reason in PROVIDER_FAULT_REASONS:
        return Fault.PROVIDER
    return Fault.REQUEST_OR_PROVIDER


class RequestBlame:
    """One request's failures, told to the providers' health once their cause is known."""

    def __init__(
        self, health: ProviderHealth, key: str, on_cooldown: Callable[[str], None]
    ) -> None:
        self._health = health
        self._key = key
        self._on_cooldown = on_cooldown
        # Providers whose failure may be the request's: held until another provider answers.
        self._held: list[str] = []
        self._request_suspected = False

    @property
    def request_suspected(self) -> bool:
        """Whether two providers failed this request in ways a request may cause (or one
        answered it with an error): the request is the common factor, and failing over further
        would only repeat it."""
        return self._request_suspected

    def failed(self, provider: str, failure: RetryableAttemptError, *, connected: bool) -> None:
        """Let the provider's health learn from a failed attempt (now, or once it is known
        whether the request was the cause)."""
        fault = fault_of(failure, connected=connected)
        if fault is Fault.RATE_LIMITED:
            self._health.rate_limited(provider, failure.retry_after)
        elif fault is Fault.UNREACHABLE:
            self._cooled(provider, self._health.unreachable(provider))
        elif fault is Fault.PROVIDER:
            self.provider_fault(provider)
        elif self._held or self._request_suspected:
            # Two providers failed this one request the same way: the request is the suspect.
            self._held.clear()
            self._request_suspected = True
        else:
            self._held.append(provider)

    def provider_fault(self, provider: str) -> None:
        """Count a fault no request can cause against the provider."""
        self._cooled(provider, self._health.failed(provider))

    def answered(self, success: bool) -> None:
        """Another provider answered this request: a 2xx clears the request of the held
        failures, which then count; an error answer (a 4xx) makes the request the suspect."""
        if success:
            self.settle()
        else:
            self._held.clear()
            self._request_suspected = True

    def settle(self) -> None:
        """The request is over: failures still held (no other provider answered) count, with
        the request's key."""
        held, self._held = self._held, []
        for provider in held:
            self._cooled(provider, self._health.failed(provider, key=self._key))

    def _cooled(self, provider: str, started: bool) -> None:
        if started:
            self._on_cooldown(provider)
