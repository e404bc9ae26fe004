"""What an upstream attempt's outcome means: retry elsewhere, or which error the client gets."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

from gateway.errors import GatewayError

RETRYABLE_STATUSES = frozenset({408, 429})


class RetryableAttemptError(Exception):
    """An attempt failed before anything reached the client; the next provider may be tried."""

    def __init__(
        self, reason: str, *, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


@dataclass
class Attempt:
    """One provider tried for a request and how it went."""

    provider: str
    outcome: str
    status: int | None = None
    retry_after: float | None = None


def check_status(response: aiohttp.ClientResponse) -> None:
    """Raise for statuses the next provider may do better with: 5xx, 408, 429 and redirects."""
    status = response.status
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise RetryableAttemptError(
            f"http_{status}",
            status=status,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )
    if 300 <= status < 400:
        raise RetryableAttemptError("redirect", status=status)


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header given in seconds; None when absent or a date."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def exhausted(attempts: Sequence[Attempt]) -> GatewayError:
    """The error for a request whose every attempt failed, by what the failures share."""
    reasons = {attempt.outcome for attempt in attempts}
    summary = ", ".join(f"{attempt.provider}: {attempt.outcome}" for attempt in attempts)
    if reasons == {"timeout"}:
        return GatewayError(
            504, f"No upstream answered in time ({summary}).", "upstream_timeout", retry_after=1
        )
    if reasons == {"http_429"}:
        waits = [attempt.retry_after for attempt in attempts if attempt.retry_after]
        return GatewayError(
            429,
            f"Every upstream is rate limiting ({summary}).",
            "upstream_rate_limited",
            retry_after=min(waits) if waits else 1,
        )
    if reasons == {"connect_error"}:
        return GatewayError(
            503, f"No upstream could be reached ({summary}).", "upstream_unreachable", retry_after=1
        )
    return GatewayError(
        502, f"No upstream gave a usable answer ({summary}).", "upstream_error", retry_after=1
    )
