"""The load shedder: a CoDel-like controller on each request's queueing delay, driven by a fake
clock."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.dispatch.permits import KeyLimits
from gateway.edge.overload import (
    FUTILE_INTERVALS,
    FUTILE_RATIO,
    LIGHT_TARGETS,
    MAX_FUTILE_GROWTH,
    MAX_REST_GROWTH,
    MAX_REST_SECONDS,
    MIN_IN_FLIGHT,
    MIN_SAMPLES,
    RETRY_AFTER_SECONDS,
    LoadShedder,
    SheddingPolicy,
)
from tests.support.gateway import settings_dict

TARGET = 0.005
INTERVAL = 0.050
# Requests arrive this far apart in the tests.
GAP = 0.002


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def shedder(
    clock: FakeClock,
    *,
    enabled: bool = True,
    counted: list[int] | None = None,
    published: list[float] | None = None,
    rested: list[int] | None = None,
) -> LoadShedder:
    """A shedder with a 5 ms target over 50 ms intervals, busy enough to shed."""
    shedding = LoadShedder(
        SheddingPolicy(target=TARGET, interval=INTERVAL, enabled=enabled),
        clock=clock,
        on_shed=(lambda: counted.append(1)) if counted is not None else None,
        on_interval=published.append if published is not None else None,
        on_rest=(lambda: rested.append(1)) if rested is not None else None,
    )
    shedding.in_flight = MIN_IN_FLIGHT
    return shedding


def arrive(shedding: LoadShedder, clock: FakeClock, delays: list[float]) -> list[bool]:
    """Requests with these queueing delays arrive `GAP` apart; whether each was admitted."""
    admitted = []
    for delay in delays:
        clock.now += GAP
        admitted.append(shedding.admits(delay, sheddable=True))
    return admitted


def overload(shedding: LoadShedder, clock: FakeClock) -> None:
    """Late requests for a whole interval: the worker becomes overloaded."""
    arrive(shedding, clock, [TARGET * 3] * (int(INTERVAL / GAP) + MIN_SAMPLES))
    assert shedding.overloaded


def test_requests_that_queue_under_the_target_are_never_refused() -> None:
    """Delays under the target, however many, never make an overload."""
    clock = FakeClock()
    shedding = shedder(clock)
    assert all(arrive(shedding, clock, [0.001, 0.004, 0.0, 0.005] * 200))
    assert not shedding.overloaded
    assert shedding.shed == 0


def test_a_burst_is_not_an_overload_while_some_request_in_each_interval_is_on_time() -> None:
    """Late requests are admitted while no run of them lasts a whole interval."""
    clock = FakeClock()
    shedding = shedder(clock)
    assert all(arrive(shedding, clock, ([0.030] * 20 + [0.001]) * 20))
    assert not shedding.overloaded
    assert shedding.episodes == 0


def test_a_whole_interval_of_late_requests_is_an_overload_that_refuses_the_late_ones() -> None:
    """Once every request waited over the target for an interval, a request that waited over
    the target is refused and counted; one on time is admitted; requests that are not
    sheddable (health, metrics, admin) are always admitted."""
    clock = FakeClock()
    counted: list[int] = []
    shedding = shedder(clock, counted=counted)
    overload(shedding, clock)
    assert shedding.episodes == 1
    assert not shedding.admits(TARGET * 1.5, sheddable=True)
    assert shedding.admits(TARGET * 0.5, sheddable=True)
    assert shedding.admits(TARGET * 10, sheddable=False)
    assert shedding.shed == len(counted) >= 1


def test_a_light_key_may_wait_longer_before_it_is_refused() -> None:
    """While overloaded, a light key's request is admitted up to twice the target."""
    clock = FakeClock()
    shedding = shedder(clock)
    overload(shedding, clock)
    within = TARGET * (LIGHT_TARGETS - 0.5)
    assert shedding.admits(within, sheddable=True, light=lambda: True)
    assert not shedding.admits(within, sheddable=True, light=lambda: False)
    assert not shedding.admits(TARGET * (LIGHT_TARGETS + 0.5), sheddable=True, light=lambda: True)


def test_a_request_that_queued_a_whole_interval_is_refused_even_before_an_overload() -> None:
    """The first requests of an overload cannot queue longer than an interval either."""
    clock = FakeClock()
    shedding = shedder(clock)
    assert not shedding.overloaded
    assert not shedding.admits(INTERVAL * 1.5, sheddable=True)
    assert shedding.admits(INTERVAL * 0.5, sheddable=True)


def test_with_few_requests_in_flight_only_the_very_late_are_refused() -> None:
    """Under `MIN_IN_FLIGHT` admitted requests, what queues is refusals: nothing within an
    interval is refused, so clients that retry at once still get answers."""
    clock = FakeClock()
    shedding = shedder(clock)
    overload(shedding, clock)
    shedding.in_flight = MIN_IN_FLIGHT - 1
    assert shedding.admits(TARGET * 3, sheddable=True)
    assert not shedding.admits(INTERVAL * 1.5, sheddable=True)


def intervals(shedding: LoadShedder, clock: FakeClock, count: int, delays: list[float]) -> None:
    """`count` whole intervals, in each of which requests with these delays arrive evenly."""
    for _ in range(count):
        started = clock.now
        for delay in delays:
            clock.now += INTERVAL / len(delays) * 0.99
            shedding.admits(delay, sheddable=True)
        clock.now = started + INTERVAL


# An interval of a closed loop past the target: every request late, all refused.
STORM = [TARGET * 3] * 25


def test_refusals_rest_when_refused_requests_come_straight_back() -> None:
    """Intervals in a row in which refusals outnumber admissions `FUTILE_RATIO` to one (after
    the overload's first moments) rest the refusals for `RETRY_AFTER_SECONDS`, counted: late
    requests within an interval are admitted; then late requests are refused again, and
    the next rest that follows soon lasts twice as long."""
    clock = FakeClock()
    rested: list[int] = []
    shedding = shedder(clock, rested=rested)
    overload(shedding, clock)
    intervals(shedding, clock, FUTILE_INTERVALS, STORM)
    shedding.tick()
    assert not shedding.resting  # the first moments of an overload are not judged
    intervals(shedding, clock, FUTILE_INTERVALS + 1, STORM)
    assert shedding.resting
    assert rested == [1]
    assert shedding.rests == 1
    shed = shedding.shed
    assert shedding.admits(INTERVAL * 0.9, sheddable=True)
    assert shedding.shed == shed
    assert not shedding.admits(INTERVAL * 1.1, sheddable=True)
    clock.now += RETRY_AFTER_SECONDS
    assert not shedding.resting
    assert shedding.overloaded
    assert not shedding.admits(TARGET * 3, sheddable=True)
    intervals(shedding, clock, FUTILE_INTERVALS + 1, STORM)
    assert shedding.resting
    clock.now += RETRY_AFTER_SECONDS
    assert shedding.resting  # twice as long
    clock.now += RETRY_AFTER_SECONDS
    assert not shedding.resting


def rest(shedding: LoadShedder, clock: FakeClock) -> None:
    """Overload the shedder with a closed loop until its refusals rest."""
    overload(shedding, clock)
    intervals(shedding, clock, FUTILE_INTERVALS * 2 + 1, STORM)
    assert shedding.resting


def test_connections_that_grow_while_refusals_rest_end_the_rest() -> None:
    """A closed loop keeps its connections; when they grow while refusals rest, the load is an
    open-loop flood after all: the rest ends, and none begins again for `MAX_REST_SECONDS`."""
    clock = FakeClock()
    shedding = shedder(clock)
    connections = [200]
    shedding.connections = lambda: connections[0]
    rest(shedding, clock)
    connections[0] += MAX_REST_GROWTH
    intervals(shedding, clock, 2, STORM)
    assert shedding.resting
    connections[0] += 1
    intervals(shedding, clock, 1, STORM)
    assert not shedding.resting
    assert not shedding.admits(TARGET * 3, sheddable=True)
    intervals(shedding, clock, int(MAX_REST_SECONDS / INTERVAL) - 2, STORM)
    assert not shedding.resting
    assert shedding.rests == 1
    intervals(shedding, clock, FUTILE_INTERVALS + 2, STORM)  # one to see the connections settle
    assert shedding.resting
    assert shedding.rests == 2


def test_refusals_while_connections_open_never_rest() -> None:
    """A flood opens connections as it queues: intervals of refusals in which more than
    `MAX_FUTILE_GROWTH` connections opened do not count towards a rest."""
    clock = FakeClock()
    shedding = shedder(clock)
    connections = [100]
    shedding.connections = lambda: connections[0]
    overload(shedding, clock)
    for _ in range(FUTILE_INTERVALS * 4):
        connections[0] += MAX_FUTILE_GROWTH + 1
        intervals(shedding, clock, 1, STORM)
    assert shedding.rests == 0
    for _ in range(FUTILE_INTERVALS * 2):
        connections[0] += MAX_FUTILE_GROWTH
        intervals(shedding, clock, 1, STORM)
    assert shedding.rests == 1


def test_refusals_that_shed_load_never_rest() -> None:
    """An open-loop overload refuses fewer than `FUTILE_RATIO` per admission, with an odd
    interval of nothing but refusals (the backlog of its first moments): refusals never rest."""
    clock = FakeClock()
    shedding = shedder(clock)
    overload(shedding, clock)
    between = ([TARGET * 3] * (FUTILE_RATIO - 1) + [TARGET / 2] * 3) * 5
    for _ in range(20):
        intervals(shedding, clock, 1, STORM)
        intervals(shedding, clock, FUTILE_INTERVALS, between)
    assert shedding.overloaded
    assert shedding.rests == 0
    assert not shedding.resting


def test_rests_double_up_to_a_bound_and_start_over_after_a_calm() -> None:
    """While refused requests keep coming back, each rest doubles up to `MAX_REST_SECONDS`;
    after that long without one, the next rest is short again, overload or not in between."""
    clock = FakeClock()
    shedding = shedder(clock)
    rest(shedding, clock)
    lengths = []
    for _ in range(6):
        began = clock.now
        while shedding.resting:
            clock.now += 0.01
        lengths.append(round(clock.now - began + INTERVAL))
        intervals(shedding, clock, FUTILE_INTERVALS + 1, STORM)
        assert shedding.resting
    assert lengths == [1, 2, 4, 8, 8, 8]
    assert MAX_REST_SECONDS == 8
    clock.now += MAX_REST_SECONDS * 2
    intervals(shedding, clock, FUTILE_INTERVALS + 1, STORM)
    assert shedding.resting
    clock.now += RETRY_AFTER_SECONDS
    assert not shedding.resting


def test_the_overload_ends_after_an_interval_without_a_late_request() -> None:
    """A whole interval in which no request waited over the target ends the overload, and
    the next one is a new episode."""
    clock = FakeClock()
    shedding = shedder(clock)
    overload(shedding, clock)
    arrive(shedding, clock, [0.001] * (int(INTERVAL / GAP) * 2 + 2))
    assert not shedding.overloaded
    assert shedding.admits(TARGET * 3, sheddable=True)
    overload(shedding, clock)
    assert shedding.episodes == 2


def test_an_idle_worker_settles_and_publishes_each_interval() -> None:
    """The smallest delay of each interval is published; with no requests, the timer's tick
    ends an overload and publishes 0."""
    clock = FakeClock()
    published: list[float] = []
    shedding = shedder(clock, published=published)
    overload(shedding, clock)
    assert published
    assert published[-1] == TARGET * 3
    for _ in range(2):  # the interval with the late requests, then an empty one
        clock.now += INTERVAL * 1.1
        shedding.tick()
    assert not shedding.overloaded
    assert published[-1] == 0.0
    assert shedding.delay == 0.0


def test_with_shedding_off_the_overload_is_reported_and_nothing_refused() -> None:
    """Off, the controller still sees the overload but admits every request."""
    clock = FakeClock()
    shedding = shedder(clock, enabled=False)
    overload(shedding, clock)
    assert not shedding.shedding
    assert shedding.admits(INTERVAL * 10, sheddable=True)
    assert shedding.shed == 0


def test_below_mean_compares_a_keys_requests_in_flight_with_the_mean_of_active_keys() -> None:
    """Keys with fewer requests in flight than the mean of keys with any are light; the mean
    follows acquisitions and releases."""
    catalog = Catalog(Settings.model_validate(settings_dict({"a": "http://127.0.0.1:1"})))
    heavy, light = catalog.keys["team-a"], catalog.keys["team-b"]
    limits = KeyLimits()
    assert not limits.below_mean(heavy)  # nobody in flight: nobody is lighter than the mean
    for _ in range(3):
        limits.acquire(heavy)
    assert limits.below_mean(light)
    assert not limits.below_mean(heavy)
    limits.acquire(light)
    assert limits.below_mean(light)  # 1 against a mean of 2
    for _ in range(3):
        limits.release(heavy)
    assert not limits.below_mean(light)
    assert limits.below_mean(heavy)  # now the one with nothing in flight
    limits.release(light)
    limits.release(light)  # one release too many changes nothing
    assert not limits.below_mean(heavy)


def test_load_shedding_is_on_by_default() -> None:
    """A config that does not mention load shedding gets it, with the documented policy."""
    server = Settings.model_validate(settings_dict({"a": "http://127.0.0.1:1"})).server
    assert server.load_shedding
    assert (server.load_shedding_target_delay_ms, server.load_shedding_interval_ms) == (5, 50)


def test_the_old_lag_target_setting_is_named_as_replaced() -> None:
    """A config with the lag target of earlier builds gets an error naming its replacement."""
    config = settings_dict({"a": "http://127.0.0.1:1"})
    config["server"] = {"load_shedding_target_lag_ms": 10}
    with pytest.raises(ValidationError, match="replaced by `load_shedding_target_delay_ms`"):
        Settings.model_validate(config)
