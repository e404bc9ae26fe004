"""Upstream outcomes: Retry-After in all its forms, upstream messages, and the final error."""

from __future__ import annotations

from email.utils import formatdate

from gateway.dispatch.outcomes import Attempt, exhausted, retry_after_seconds, upstream_message

NOW = 1_800_000_000.0


def test_retry_after_takes_the_largest_of_seconds_date_and_milliseconds() -> None:
    """Seconds, an HTTP date and `retry-after-ms` are all read; the longest wait wins."""
    assert retry_after_seconds({"Retry-After": "30"}, NOW) == 30
    assert retry_after_seconds({"retry-after-ms": "1500"}, NOW) == 1.5
    date = formatdate(NOW + 20, usegmt=True)
    assert retry_after_seconds({"Retry-After": date}, NOW) == 20
    assert retry_after_seconds({"Retry-After": "3", "retry-after-ms": "7500"}, NOW) == 7.5
    assert retry_after_seconds({}, NOW) is None


def test_retry_after_ignores_garbage_and_dates_in_the_past() -> None:
    """Unparseable, negative or infinite values are no wait; a past date is zero."""
    assert retry_after_seconds({"Retry-After": "soon"}, NOW) is None
    assert retry_after_seconds({"Retry-After": "-5"}, NOW) is None
    assert retry_after_seconds({"retry-after-ms": "inf"}, NOW) is None
    assert retry_after_seconds({"Retry-After": formatdate(NOW - 60, usegmt=True)}, NOW) == 0


def test_upstream_messages_are_read_from_common_shapes_without_urls() -> None:
    """OpenAI, FastAPI and bare-string error bodies give their message, URLs removed."""
    assert upstream_message(b'{"error": {"message": "Overloaded at http://10.1.2.3:8000/v1"}}') == (
        "Overloaded at [url]"
    )
    assert upstream_message(b'{"detail": "Not ready"}') == "Not ready"
    assert upstream_message(b'{"error": "Busy"}') == "Busy"
    assert upstream_message(b"<html>502</html>") is None


def test_every_attempt_failing_upstream_gives_the_last_status_and_message() -> None:
    """The last upstream's status and message reach the client, Retry-After its largest."""
    error = exhausted(
        [
            Attempt("a", "http_500", 500, None, "Boom"),
            Attempt("b", "http_503", 503, 30.0, "Warming up"),
        ]
    )
    assert (error.status, error.code, error.retry_after) == (503, "upstream_error", 30.0)
    assert error.message.startswith("Warming up")


def test_a_refused_provider_credential_is_never_the_clients_invalid_key() -> None:
    """A last attempt refused for the provider's credential is a 502 `upstream_auth_failed`."""
    error = exhausted([Attempt("a", "upstream_auth_failed", 401)])
    assert (error.status, error.code) == (502, "upstream_auth_failed")


def test_timeouts_give_a_504_without_retry_after() -> None:
    """A request that timed out everywhere is a 504 the client is not told to retry soon."""
    error = exhausted([Attempt("a", "timeout"), Attempt("b", "timeout")])
    assert (error.status, error.retry_after) == (504, None)


def test_every_provider_rate_limiting_gives_the_soonest_retry_after() -> None:
    """All attempts 429: the client may come back when the first provider is free again."""
    error = exhausted(
        [Attempt("a", "http_429", 429, 5.0, "Slow down"), Attempt("b", "http_429", 429, 9.0)]
    )
    assert (error.status, error.code, error.retry_after) == (429, "upstream_rate_limited", 5.0)


def test_no_retry_after_is_invented_for_a_relayed_error() -> None:
    """Issue 20: without an upstream Retry-After the relayed error carries none (it used to
    gain the gateway's 1 s); only the gateway's own 503 for unreachable upstreams has one."""
    assert exhausted([Attempt("a", "http_500", 500, None, "Boom")]).retry_after is None
    limited = [Attempt("a", "http_429", 429), Attempt("b", "http_429", 429)]
    assert exhausted(limited).retry_after is None
    assert exhausted([Attempt("a", "upstream_auth_failed", 401)]).retry_after is None
    assert exhausted([Attempt("a", "invalid_response", 200)]).retry_after is None
    unreachable = exhausted([Attempt("a", "connect_error"), Attempt("b", "connect_timeout")])
    assert (unreachable.status, unreachable.retry_after) == (503, 1.0)
