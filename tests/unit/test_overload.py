"""The load shedder: a CoDel-like controller on event-loop lag, driven by a fake clock."""

from __future__ import annotations

import pytest

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.dispatch.permits import KeyLimits
from gateway.edge.overload import MIN_SAMPLES, LoadShedder, SheddingPolicy
from tests.support.gateway import settings_dict

TARGET = 0.010
INTERVAL = 0.100
PROBE = 0.005


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Dice:
    """The shedder's random draws, chosen by the test."""

    def __init__(self, value: float = 0.5) -> None:
        self.value = value

    def __call__(self) -> float:
        return self.value


def shedder(
    clock: FakeClock, dice: Dice | None = None, counted: list[int] | None = None
) -> LoadShedder:
    """A shedder with a 10 ms target over 100 ms intervals."""
    return LoadShedder(
        SheddingPolicy(target_lag=TARGET, interval=INTERVAL),
        clock=clock,
        chance=dice or Dice(),
        on_shed=(lambda: counted.append(1)) if counted is not None else None,
    )


def run(shedding: LoadShedder, clock: FakeClock, lags: list[float]) -> None:
    """Feed probe samples as the real probe would: each arrives its sleep plus its lag later."""
    for lag in lags:
        clock.now += PROBE + lag
        shedding.observe(lag)


def overload(shedding: LoadShedder, clock: FakeClock, lag: float, intervals: int) -> None:
    """Keep the loop late by `lag` on every probe for this many intervals."""
    per_interval = max(MIN_SAMPLES, int(INTERVAL / (PROBE + lag)) + 1)
    run(shedding, clock, [lag] * per_interval * intervals)


def test_a_loop_that_keeps_up_sheds_nothing() -> None:
    """Lag under the target, however long, never refuses a request."""
    clock = FakeClock()
    shedding = shedder(clock, Dice(0.0))
    run(shedding, clock, [0.002, 0.008, 0.0, 0.009] * 100)
    assert not shedding.overloaded
    assert shedding.admits(light=False)
    assert shedding.shed == 0


def test_bursts_are_not_an_overload_while_the_smallest_lag_stays_low() -> None:
    """Late probes in every interval do not count while one probe per interval is on time."""
    clock = FakeClock()
    shedding = shedder(clock, Dice(0.0))
    run(shedding, clock, [0.080, 0.060, 0.001] * 40)
    assert not shedding.overloaded
    assert shedding.admits(light=False)


def test_one_long_pause_is_not_an_overload() -> None:
    """A single stall longer than the interval is one sample: it alone does not start shedding."""
    clock = FakeClock()
    shedding = shedder(clock, Dice(0.0))
    run(shedding, clock, [0.001] * 20)
    run(shedding, clock, [1.5, 0.001, 0.001])
    assert not shedding.overloaded


def test_lag_over_the_target_for_an_interval_sheds_and_counts_with_a_503_budget() -> None:
    """A whole interval over the target starts shedding: a draw under the probability is refused
    and counted; one over it is admitted."""
    clock = FakeClock()
    dice = Dice()
    counted: list[int] = []
    shedding = shedder(clock, dice, counted)
    overload(shedding, clock, 0.030, intervals=1)
    assert shedding.overloaded
    assert shedding.episodes == 1
    assert shedding.lag == pytest.approx(0.030)
    probability = shedding.probability
    assert 0 < probability < 1
    dice.value = probability / 2
    assert not shedding.admits(light=False)
    dice.value = min(1.0, probability * 1.5)
    assert shedding.admits(light=False)
    assert shedding.shed == 1
    assert counted == [1]


def test_the_probability_grows_while_the_overload_lasts_and_faster_when_further_over() -> None:
    """Each overloaded interval raises the probability, up to refusing every new request; a lag
    far over the target raises it faster than one just over it."""
    slow_clock, fast_clock = FakeClock(), FakeClock()
    mild, severe = shedder(slow_clock), shedder(fast_clock)
    overload(mild, slow_clock, 0.012, intervals=2)
    overload(severe, fast_clock, 0.060, intervals=2)
    assert 0 < mild.probability < severe.probability
    previous = severe.probability
    overload(severe, fast_clock, 0.060, intervals=1)
    assert severe.probability > previous
    overload(severe, fast_clock, 0.060, intervals=20)
    assert severe.probability == 1.0
    assert not severe.admits(light=True)


def test_shedding_stops_once_the_loop_keeps_up_again() -> None:
    """Calm intervals lower the probability back to zero; then every request is admitted."""
    clock = FakeClock()
    shedding = shedder(clock, Dice(0.0))
    overload(shedding, clock, 0.050, intervals=5)
    assert shedding.overloaded
    high = shedding.probability
    run(shedding, clock, [0.007] * 40)  # under the target, above half of it: eases slowly
    assert 0 < shedding.probability < high
    run(shedding, clock, [0.0] * 2000)
    assert not shedding.overloaded
    assert shedding.admits(light=False)
    overload(shedding, clock, 0.050, intervals=2)  # the first may still hold calm samples
    assert shedding.episodes == 2


def test_a_light_key_is_refused_less_often_than_a_heavy_one() -> None:
    """A key below the mean in flight is refused with the probability squared: a draw between
    the two refuses the heavy key and admits the light one."""
    clock = FakeClock()
    dice = Dice()
    shedding = shedder(clock, dice)
    overload(shedding, clock, 0.030, intervals=3)
    probability = shedding.probability
    assert 0 < probability < 1
    dice.value = (probability + probability**2) / 2
    assert shedding.admits(light=True)
    assert not shedding.admits(light=False)
    dice.value = probability**2 / 2
    assert not shedding.admits(light=True)


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
