"""What an upstream attempt's outcome means: retry elsewhere, or which error the client gets."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import orjson

from gateway.dispatch.http1 import UpstreamError
from gateway.edge.errors import GatewayError

if TYPE_CHECKING:
    from gateway.dispatch.upstream_pool import UpstreamResponse

RETRYABLE_STATUSES = frozenset({408, 429})
# A provider's own credential refused: its misconfiguration, never the client's key.
AUTH_STATUSES = frozenset({401, 403})
# How much of a failed upstream answer is read for its message.
ERROR_BODY_BYTES = 64 * 1024
MESSAGE_CHARACTERS = 500
# The gateway's own pause before a client retries a request that failed upstream.
GATEWAY_RETRY_AFTER = 1.0
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://\S+")


@dataclass(frozen=True)
class UpstreamErrorAnswer:
    """An upstream's whole error answer (status, content type, body as it sent it), kept so the
    client can get it unchanged when the request fails there."""

    status: int
    content_type: str | None
    body: bytes


class RetryableAttemptError(Exception):
    """An attempt failed before anything reached the client; the next provider may be tried.
    `answer` is the upstream's whole error answer, when it sent one and it was read in full."""

    def __init__(
        self,
        reason: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        message: str | None = None,
        answer: UpstreamErrorAnswer | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.message = message
        self.answer = answer


@dataclass
class Attempt:
    """One provider tried for a request and how it went (with the upstream's error, if any)."""

    provider: str
    outcome: str
    status: int | None = None
    retry_after: float | None = None
    message: str | None = None


async def failed_status(
    response: UpstreamResponse, secret: str | None = None
) -> RetryableAttemptError | None:
    """The failure for statuses the next provider may do better with (5xx, 408, 429, 401/403
    and redirects), with the upstream's message (`secret` redacted) and Retry-After; None for
    any other status."""
    status = response.status
    if 300 <= status < 400:
        return RetryableAttemptError("redirect", status=status)
    auth = status in AUTH_STATUSES
    if not (status >= 500 or status in RETRYABLE_STATUSES or auth):
        return None
    retry_after = retry_after_seconds(response.headers)
    if auth:
        return RetryableAttemptError("upstream_auth_failed", status=status, retry_after=retry_after)
    body, whole = await _bounded_body(response)
    answer = UpstreamErrorAnswer(status, response.headers.get("Content-Type"), body)
    return RetryableAttemptError(
        f"http_{status}",
        status=status,
        retry_after=retry_after,
        message=_redacted(upstream_message(body), secret),
        answer=answer if whole else None,
    )


def _redacted(message: str | None, secret: str | None) -> str | None:
    if message is None or not secret:
        return message
    return message.replace(secret, "[redacted]")


async def _bounded_body(response: UpstreamResponse) -> tuple[bytes, bool]:
    """Up to ERROR_BODY_BYTES of the body, and whether that is all of it."""
    body = b""
    try:
        while len(body) <= ERROR_BODY_BYTES:
            chunk = await response.read()
            if not chunk:
                return body, True
            body += chunk
    except UpstreamError:
        pass
    return body[:ERROR_BODY_BYTES], False


def upstream_message(body: bytes) -> str | None:
    """The message of an OpenAI-, vLLM- or FastAPI-shaped error body, URLs removed, capped."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = document.get("error", document) if isinstance(document, dict) else None
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        return None
    message = error.get("message", error.get("detail"))
    if not isinstance(message, str) or not message.strip():
        return None
    return _URL.sub("[url]", message)[:MESSAGE_CHARACTERS]


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The longest wait an upstream asked for: `Retry-After` (seconds or an HTTP date) or
    `retry-after-ms`; None when it asked for none."""
    waits: list[float] = []
    value = headers.get("Retry-After")
    if value is not None:
        waits.extend(_seconds_or_date(value.strip(), time.time() if now is None else now))
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        waits.extend(wait / 1000 for wait in _non_negative(milliseconds.strip()))
    return max(waits) if waits else None


def _seconds_or_date(value: str, now: float) -> list[float]:
    seconds = _non_negative(value)
    if seconds:
        return seconds
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return []
    if moment.tzinfo is None:
        return []
    return [max(0.0, moment.timestamp() - now)]


def _non_negative(value: str) -> list[float]:
    try:
        number = float(value)
    except ValueError:
        return []
    return [number] if math.isfinite(number) and number >= 0 else []


def exhausted(attempts: Sequence[Attempt]) -> GatewayError:
    """The error for a request whose every attempt failed.

    When every attempt failed with an upstream status, the last one's status and message reach
    the client; a refused provider credential is a 502 `upstream_auth_failed`. `Retry-After` is
    the larger of the last upstream's (the largest of its forms) and the gateway's own — when
    every provider rate limits, the soonest of theirs; a timeout carries none.
    """
    reasons = {attempt.outcome for attempt in attempts}
    summary = ", ".join(f"{attempt.provider}: {attempt.outcome}" for attempt in attempts)
    last = attempts[-1]
    own = max(GATEWAY_RETRY_AFTER, last.retry_after or 0.0)
    if last.outcome == "upstream_auth_failed":
        return GatewayError(
            502,
            f"The upstream refused the gateway's credential ({summary}); "
            "the operator must fix the provider's api_key.",
            "upstream_auth_failed",
            retry_after=own,
        )
    if reasons <= {"timeout", "connect_timeout"} and "timeout" in reasons:
        return GatewayError(504, f"No upstream answered in time ({summary}).", "upstream_timeout")
    if reasons == {"http_429"}:
        # Every provider is rate limiting: the soonest any of them is free again.
        waits = [attempt.retry_after for attempt in attempts if attempt.retry_after]
        detail = last.message or "Every upstream is rate limiting."
        return GatewayError(
            429,
            f"{detail} ({summary})",
            "upstream_rate_limited",
            retry_after=max(GATEWAY_RETRY_AFTER, min(waits)) if waits else GATEWAY_RETRY_AFTER,
        )
    if all(attempt.outcome.startswith("http_") for attempt in attempts):
        assert last.status is not None  # an http_ outcome carries its status
        code = "upstream_error"
        detail = last.message or f"The upstream answered {last.status}."
        return GatewayError(last.status, f"{detail} ({summary})", code, retry_after=own)
    if reasons <= {"connect_error", "connect_timeout"}:
        return GatewayError(
            503, f"No upstream could be reached ({summary}).", "upstream_unreachable", retry_after=1
        )
    return GatewayError(
        502, f"No upstream gave a usable answer ({summary}).", "upstream_error", retry_after=own
    )


def relayed(
    error: GatewayError, attempts: Sequence[Attempt], answer: UpstreamErrorAnswer | None
) -> GatewayError:
    """`error`, answered with the last upstream's own error body when the error stands for it
    (the same status: every attempt failed upstream, the last one with `answer`). The client
    then gets that body byte for byte (but the model rename and a redacted credential), as it
    would directly; the gateway's summary goes in `x-gateway-error`, never into the body."""
    if answer is None or answer.status != error.status or error.code == "upstream_auth_failed":
        return error
    summary = ", ".join(f"{attempt.provider}: {attempt.outcome}" for attempt in attempts)
    error.body = answer.body
    error.content_type = answer.content_type
    error.headers["x-gateway-error"] = f"{error.code}: every attempt failed upstream ({summary})"
    return error
