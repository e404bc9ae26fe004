"""The retry budget: a share of the worker's requests in flight, with a floor; and when a client
is told not to resend."""

from __future__ import annotations

from gateway.config_service import RoutingSettings
from gateway.dispatch.outcomes import Attempt
from gateway.dispatch.retries import BUDGET, RetryBudget, resend_is_futile


def budget(in_flight: list[int], refusals: list[str], **routing: float) -> RetryBudget:
    """A budget over a mutable in-flight count, recording its refusals."""
    return RetryBudget(
        RoutingSettings.model_validate(routing),
        lambda: in_flight[0],
        on_refused=refusals.append,
    )


def test_the_limit_is_twenty_percent_of_the_requests_in_flight_and_at_least_three() -> None:
    """Defaults: max(3, floor(20 % of in flight))."""
    in_flight = [0]
    retries = budget(in_flight, [])
    for requests, limit in [(0, 3), (14, 3), (15, 3), (20, 4), (40, 8), (1000, 200)]:
        in_flight[0] = requests
        assert retries.limit() == limit, requests


def test_retries_past_the_limit_are_refused_until_one_ends() -> None:
    """Admitted retries hold their place until released (once, however often released)."""
    in_flight = [10]
    refusals: list[str] = []
    retries = budget(in_flight, refusals)
    slots = [retries.try_start() for _ in range(3)]
    assert all(slot is not None for slot in slots)
    assert retries.try_start() is None
    assert refusals == [BUDGET]
    first = slots[0]
    assert first is not None
    first.release()
    first.release()
    assert retries.active == 2
    assert retries.try_start() is not None
    assert retries.try_start() is None
    assert refusals == [BUDGET, BUDGET]


def test_a_reload_changes_the_share_and_keeps_the_retries_under_way() -> None:
    """After reconfigure, retries under way still count against the new limit."""
    in_flight = [100]
    retries = budget(in_flight, [], retry_budget_percent=5, retry_budget_min_concurrent=0)
    held = [retries.try_start() for _ in range(5)]
    assert None not in held
    assert retries.try_start() is None
    retries.reconfigure(RoutingSettings.model_validate({"retry_budget_percent": 6}))
    assert retries.active == 5
    assert retries.try_start() is not None
    assert retries.try_start() is None


def test_a_full_share_never_refuses_a_request_in_flight() -> None:
    """At 100 % every request in flight may be retrying: no budget at all."""
    in_flight = [4]
    retries = budget(in_flight, [], retry_budget_percent=100, retry_budget_min_concurrent=0)
    assert all(retries.try_start() is not None for _ in range(4))


def test_a_resend_is_futile_unless_every_failure_was_harmless_to_repeat() -> None:
    """Refused connections and 429s cost the upstreams nothing when resent later; any other
    failure would be repeated."""
    refused = Attempt("a", "connect_error")
    limited = Attempt("b", "http_429", 429, 4.0)
    assert not resend_is_futile([refused, limited, Attempt("c", "connect_timeout")])
    assert resend_is_futile([refused, Attempt("b", "http_500", 500)])
    assert resend_is_futile([Attempt("a", "timeout")])
    assert resend_is_futile([Attempt("a", "upstream_auth_failed", 401)])


def test_a_retry_after_a_connection_never_made_needs_no_place_in_the_budget() -> None:
    """A node that dies under load: requests that could not connect go on to the next provider
    even with the budget spent (nothing reached an upstream); an upstream 500 still waits."""
    in_flight = [10]
    refusals: list[str] = []
    retries = budget(in_flight, refusals)
    held = [retries.try_start() for _ in range(3)]
    assert all(slot is not None for slot in held)
    for outcome in ("connect_error", "connect_timeout"):
        free = retries.try_start(after=outcome)
        assert free is not None
        free.release()
    assert retries.active == 3
    assert retries.try_start(after="http_500") is None
    assert refusals == [BUDGET]
