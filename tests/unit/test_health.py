"""Provider health: which failures count, the two-key rule, and the cooling share."""

from __future__ import annotations

from gateway.config_service import RoutingSettings
from gateway.dispatch.blame import Fault, RequestBlame, fault_of
from gateway.dispatch.health import ProviderHealth
from gateway.dispatch.outcomes import RetryableAttemptError

ROUTING = RoutingSettings(allowed_fails=3, cooldown_seconds=10, cooldown_max_seconds=100)
TWO = {"model": ["node-a", "node-b"]}


def health_for(
    serving: dict[str, list[str]], routing: RoutingSettings = ROUTING
) -> tuple[ProviderHealth, list[float]]:
    """A health tracker on a clock the test moves."""
    now = [1000.0]
    return ProviderHealth(routing, serving=serving, clock=lambda: now[0]), now


def http(status: int) -> RetryableAttemptError:
    """The failure an upstream status gives."""
    return RetryableAttemptError(f"http_{status}", status=status)


def test_one_keys_failures_never_cool_a_provider() -> None:
    """A hundred failures in a row, all from one key's requests, leave the provider serving."""
    health, _ = health_for(TWO)
    assert not any(health.failed("node-a", key="team-a") for _ in range(100))
    assert not health.cooling("node-a")


def test_a_run_with_two_keys_cools_after_allowed_fails() -> None:
    """Failures from two keys in one run count in full: the third cools the provider."""
    health, _ = health_for(TWO)
    assert not health.failed("node-a", key="team-a")
    assert not health.failed("node-a", key="team-a")
    assert health.failed("node-a", key="team-b")
    assert health.cooling("node-a")
    assert health.cooling_remaining("node-a") == 10


def test_a_success_ends_the_run_and_forgets_its_keys() -> None:
    """A success between two keys' failures means no run holds both."""
    health, _ = health_for(TWO)
    for _ in range(5):
        health.failed("node-a", key="team-a")
    health.succeeded("node-a")
    assert not health.failed("node-a", key="team-b")
    assert not health.failed("node-a", key="team-b")
    assert not health.cooling("node-a")


def test_one_keys_failures_do_not_help_provider_faults_along() -> None:
    """In a run with one key, only the provider faults count toward allowed_fails."""
    health, _ = health_for(TWO)
    health.failed("node-a", key="team-a")
    health.failed("node-a", key="team-a")
    assert not health.failed("node-a")
    assert not health.failed("node-a")
    assert health.failed("node-a")


def test_the_share_holds_back_a_second_cooldown() -> None:
    """With two providers and a share of 0.5, the second provider's faults do not cool it while
    the first cools; they do once the first is back."""
    health, now = health_for(TWO)
    assert [health.failed("node-a") for _ in range(3)] == [False, False, True]
    assert [health.failed("node-b") for _ in range(3)] == [False, False, False]
    assert not health.cooling("node-b")
    now[0] += 11
    assert health.failed("node-b")
    assert health.cooling("node-b")


def test_a_withheld_cooldown_is_reported_once_per_run() -> None:
    """A provider whose cooldown the share withholds is reported once per run of failures and
    shows as withholding until a success ends the run."""
    now = [1000.0]
    reported: list[str] = []
    health = ProviderHealth(
        ROUTING, serving={"model": ["node-a"]}, clock=lambda: now[0], on_withheld=reported.append
    )
    assert not any(health.failed("node-a") for _ in range(7))
    assert reported == ["node-a"]
    assert health.withholding("node-a")
    health.succeeded("node-a")
    assert not health.withholding("node-a")
    assert not any(health.failed("node-a") for _ in range(3))
    assert reported == ["node-a", "node-a"]


def test_a_lone_provider_is_never_cooled_by_faults_within_the_share() -> None:
    """A model's only provider is half of nothing: faults do not cool it; 429s still do."""
    health, _ = health_for({"model": ["node-a"]})
    assert not any(health.failed("node-a") for _ in range(10))
    health.rate_limited("node-a", 5)
    assert health.cooling("node-a")


def test_an_unreachable_provider_cools_past_the_share() -> None:
    """A provider that cannot be reached cools even when the share is used up."""
    health, _ = health_for(TWO)
    for _ in range(3):
        health.failed("node-a")
    assert [health.unreachable("node-b") for _ in range(3)] == [False, False, True]
    assert health.cooling("node-a")
    assert health.cooling("node-b")


def test_unreachable_cooling_counts_toward_the_share() -> None:
    """A dead provider takes the share: another's faults are then held back."""
    health, _ = health_for(TWO)
    for _ in range(3):
        health.unreachable("node-a")
    assert not any(health.failed("node-b") for _ in range(5))


def test_every_model_of_a_provider_must_stay_within_the_share() -> None:
    """A provider serving two models cools only if both keep within the share."""
    health, _ = health_for({"big": ["node-a", "node-b", "node-c", "node-d"], "small": ["node-a"]})
    assert not any(health.failed("node-a") for _ in range(5))
    assert [health.failed("node-b") for _ in range(3)] == [False, False, True]


def test_a_share_of_one_cools_everything_and_zero_nothing() -> None:
    """max_cooling_fraction 1 is the old behaviour; 0 means faults never cool."""
    every, _ = health_for(TWO, ROUTING.model_copy(update={"max_cooling_fraction": 1.0}))
    for name in ("node-a", "node-b"):
        assert [every.failed(name) for _ in range(3)] == [False, False, True]
    never, _ = health_for(TWO, ROUTING.model_copy(update={"max_cooling_fraction": 0.0}))
    assert not any(never.failed("node-a") for _ in range(10))


def test_failures_are_classified_by_whose_they_can_be() -> None:
    """Only failures a request could have caused wait for the key rule."""
    assert fault_of(RetryableAttemptError("connect_error"), connected=False) is Fault.UNREACHABLE
    assert fault_of(RetryableAttemptError("connect_timeout")) is Fault.UNREACHABLE
    assert fault_of(http(429)) is Fault.RATE_LIMITED
    assert fault_of(http(503)) is Fault.PROVIDER
    assert fault_of(RetryableAttemptError("invalid_response", status=200)) is Fault.PROVIDER
    assert fault_of(RetryableAttemptError("payload_error")) is Fault.PROVIDER
    for failure in (
        http(500),
        http(502),
        http(504),
        http(408),
        RetryableAttemptError("upstream_auth_failed", status=403),
        RetryableAttemptError("redirect", status=302),
        RetryableAttemptError("timeout"),
        RetryableAttemptError("connect_error"),  # connected, then dropped before any answer
    ):
        assert fault_of(failure) is Fault.REQUEST_OR_PROVIDER, failure.reason


def blame_for(health: ProviderHealth, key: str, cooled: list[str]) -> RequestBlame:
    """One request's blame, noting the cooldowns it starts."""
    return RequestBlame(health, key, cooled.append)


def test_a_request_that_fails_on_two_providers_blames_neither() -> None:
    """Two keys' requests that 500 on both providers: the requests are the common factor."""
    health, _ = health_for(TWO)
    cooled: list[str] = []
    for key in ("team-a", "team-b") * 5:
        blame = blame_for(health, key, cooled)
        blame.failed("node-a", http(500), connected=True)
        blame.failed("node-b", http(500), connected=True)
        blame.settle()
    assert cooled == []
    assert not health.cooling("node-a")
    assert not health.cooling("node-b")


def test_a_failure_another_provider_answered_well_counts_with_its_key() -> None:
    """A 500 on node-a, then a 2xx on node-b for the same request: node-a is blamed, and once
    two keys have seen it, it cools."""
    health, _ = health_for(TWO)
    cooled: list[str] = []
    for key in ("team-a", "team-a", "team-b"):
        blame = blame_for(health, key, cooled)
        blame.failed("node-a", http(500), connected=True)
        blame.answered(success=True)
        blame.settle()
    assert cooled == ["node-a"]


def test_an_error_answer_elsewhere_clears_the_provider() -> None:
    """A 500 on node-a, then a 400 on node-b: the request was bad, node-a is not blamed."""
    health, _ = health_for(TWO)
    for key in ("team-a", "team-b") * 3:
        blame = blame_for(health, key, [])
        blame.failed("node-a", http(500), connected=True)
        blame.answered(success=False)
        blame.settle()
    assert not health.cooling("node-a")


def test_unanswered_failures_count_when_the_request_ends() -> None:
    """With no other provider's answer to compare, the failure counts with the key at the end."""
    health, _ = health_for(TWO)
    cooled: list[str] = []
    for key in ("team-a", "team-b", "team-a"):
        blame = blame_for(health, key, cooled)
        blame.failed("node-a", RetryableAttemptError("timeout"), connected=True)
        assert not cooled
        blame.settle()
    assert cooled == ["node-a"]
