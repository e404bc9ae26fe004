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

from gateway.dispatch.upstream_errors import (
    RequestNotReadError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamMalformedError,
    UpstreamTlsError,
)
from gateway.shared.errors import GatewayError
from gateway.shared.redaction import Redactor

if TYPE_CHECKING:
    from gateway.dispatch.upstream_response import UpstreamResponse

RETRYABLE_STATUSES = frozenset({408, 429})
# A provider's own credential refused: its misconfiguration, never the client's key.
AUTH_STATUSES = frozenset({401, 403})
# How much of a failed upstream answer is read for its message.
ERROR_BODY_BYTES = 64 * 1024
MESSAGE_CHARACTERS = 500
# The gateway's own pause before a client resends a request no upstream could take.
GATEWAY_RETRY_AFTER = 1.0
# Outcomes of attempts the upstream may have run (the request went out, no usable answer came):
# the client is not invited to retry them at once.
MAY_HAVE_RUN = frozenset({"dropped_after_send", "malformed_answer", "payload_error"})
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


def outcome_of(error: UpstreamError, *, answered: bool) -> str:
    """The outcome of an attempt the upstream client failed: `connect_error` (nothing reached
    the upstream: no connection, or a close before it read the request), `tls_error` (the
    handshake failed), `malformed_answer` (an answer head that cannot be relayed),
    `dropped_after_send` (the connection ended after the request went out, before an answer),
    `payload_error` (the answer's body broke)."""
    if answered:
        return "payload_error"
    if isinstance(error, UpstreamTlsError):
        return "tls_error"
    if isinstance(error, UpstreamConnectError | RequestNotReadError):
        return "connect_error"
    if isinstance(error, UpstreamMalformedError):
        return "malformed_answer"
    return "dropped_after_send"


async def failed_status(
    response: UpstreamResponse, redactor: Redactor | None = None
) -> RetryableAttemptError | None:
    """The failure for statuses the next provider may do better with (5xx, 408, 429, 401/403
    and redirects), with the upstream's message (the provider's credential redacted) and
    Retry-After; None for any other status."""
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
        message=_redacted(upstream_message(body), redactor),
        answer=answer if whole else None,
    )


def _redacted(message: str | None, redactor: Redactor | None) -> str | None:
    if message is None or redactor is None:
        return message
    return redactor.redact_text(message)


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
    passed on only when an upstream sent one: the last upstream's (the largest of its forms), or
    when every provider rate limits, the soonest of theirs. None is invented for a relayed error,
    nor for an attempt that may have run (`MAY_HAVE_RUN`). Nothing reached any upstream: 503
    `upstream_unreachable` with the gateway's own `Retry-After` (`GATEWAY_RETRY_AFTER`), or 502
    `upstream_tls_failed` when TLS failed.
    """
    reasons = {attempt.outcome for attempt in attempts}
    summary = ", ".join(f"{attempt.provider}: {attempt.outcome}" for attempt in attempts)
    last = attempts[-1]
    upstreams = last.retry_after
    if last.outcome == "upstream_auth_failed":
        return GatewayError(
            502,
            f"The upstream refused the gateway's credential ({summary}); "
            "the operator must fix the provider's api_key.",
            "upstream_auth_failed",
            retry_after=upstreams,
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
            retry_after=min(waits) if waits else None,
        )
    if all(attempt.outcome.startswith("http_") for attempt in attempts):
        assert last.status is not None  # an http_ outcome carries its status
        code = "upstream_error"
        detail = last.message or f"The upstream answered {last.status}."
        return GatewayError(last.status, f"{detail} ({summary})", code, retry_after=upstreams)
    if reasons <= {"connect_error", "connect_timeout"}:
        return GatewayError(
            503,
            f"No upstream could be reached ({summary}).",
            "upstream_unreachable",
            retry_after=GATEWAY_RETRY_AFTER,
        )
    if reasons <= {"connect_error", "connect_timeout", "tls_error"}:
        return GatewayError(
            502,
            f"No TLS connection to the upstream could be made ({summary}); the operator must "
            "fix the provider's certificate or trusted CAs.",
            "upstream_tls_failed",
        )
    if reasons & MAY_HAVE_RUN:
        # The request went out and may have run: a retry is the client's call, not an invitation.
        return GatewayError(502, f"No upstream gave a usable answer ({summary}).", "upstream_error")
    return GatewayError(
        502,
        f"No upstream gave a usable answer ({summary}).",
        "upstream_error",
        retry_after=upstreams,
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
