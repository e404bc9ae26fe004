"""Latency samples, smoothed scores and bands centred on the model's global mean."""

from __future__ import annotations

import math
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.routing.latency import (
    MAX_SAMPLE_SECONDS,
    LatencyTracker,
    round_half_away_from_zero,
    score_band,
)

MODEL = "llama"
WINDOW = 900.0


def bands_at(
    tracker: LatencyTracker, providers: Sequence[str], now: float, *, model: str = MODEL
) -> dict[str, int]:
    """Return the bands with the default settings: 15 % tolerance, at least 20 samples."""
    return tracker.bands(model, providers, now, band_fraction=0.15, min_samples=20, enabled=True)


def record_many(
    tracker: LatencyTracker, provider: str, ttft_seconds: float, count: int, now: float = 0.0
) -> None:
    """Record `count` identical samples for `provider` at time `now`."""
    for _ in range(count):
        tracker.record(provider, MODEL, ttft_seconds, now)


def tracker_with_average_of_half_a_second(fast_seconds: float) -> LatencyTracker:
    """Return a tracker where `a` has 20 samples at `fast_seconds` and `c` makes the mean 0.5 s."""
    tracker = LatencyTracker(WINDOW)
    record_many(tracker, "a", fast_seconds, 20)
    slow_count = 10
    slow_seconds = (0.5 * (20 + slow_count) - fast_seconds * 20) / slow_count
    record_many(tracker, "c", slow_seconds, slow_count)
    return tracker


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.5, 1),
        (-0.5, -1),
        (2.5, 3),
        (-2.5, -3),
        (1.5, 2),
        (0.0, 0),
        (-0.0, 0),
        (0.49999999999999994, 0),
        (-0.49999999999999994, 0),
        (0.6667, 1),
        (-0.6667, -1),
        (1.4999999999999998, 1),
    ],
)
def test_round_half_away_from_zero_rounds_halves_away_from_zero(
    value: float, expected: int
) -> None:
    """Halves round away from zero (not banker's rounding); the rest round to nearest."""
    assert round_half_away_from_zero(value) == expected


@given(st.floats(min_value=-1e12, max_value=1e12, allow_nan=False))
def test_round_half_away_from_zero_matches_decimal_half_up(value: float) -> None:
    """For any finite float the result equals exact decimal ROUND_HALF_UP rounding."""
    expected = int(Decimal(value).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    assert round_half_away_from_zero(value) == expected


def test_unsampled_provider_scores_the_global_mean_and_lands_in_band_zero() -> None:
    """A provider without samples is neutral: exactly the global mean, band 0, not a penalty."""
    tracker = tracker_with_average_of_half_a_second(0.42)
    snapshot = tracker.snapshot(MODEL, 1.0, providers=["b"])
    unsampled = next(entry for entry in snapshot.providers if entry.provider == "b")
    assert unsampled.score_seconds == snapshot.global_mean_seconds
    assert unsampled.sample_count == 0
    assert unsampled.mean_seconds is None
    assert bands_at(tracker, ["b"], 1.0) == {"b": 0}


def test_provider_within_fifteen_percent_ties_with_unsampled_provider_in_band_zero() -> None:
    """Global 500 ms, `a` at 420 ms over 20 samples smooths to 436 ms: band 0, tied with `b`."""
    tracker = tracker_with_average_of_half_a_second(0.42)
    snapshot = tracker.snapshot(MODEL, 1.0)
    assert snapshot.global_mean_seconds == pytest.approx(0.5)
    score_a = next(entry.score_seconds for entry in snapshot.providers if entry.provider == "a")
    assert score_a == pytest.approx(0.436)
    assert bands_at(tracker, ["a", "b", "c"], 1.0) == {"a": 0, "b": 0, "c": 1}


def test_provider_twenty_percent_faster_than_average_lands_one_band_lower() -> None:
    """Global 500 ms, `a` at 375 ms over 20 samples smooths to exactly 400 ms: 20 % off, band -1."""
    tracker = tracker_with_average_of_half_a_second(0.375)
    snapshot = tracker.snapshot(MODEL, 1.0)
    score_a = next(entry.score_seconds for entry in snapshot.providers if entry.provider == "a")
    assert score_a == pytest.approx(0.4)
    assert bands_at(tracker, ["a", "b"], 1.0) == {"a": -1, "b": 0}


def test_bands_are_centred_on_the_global_mean_not_counted_from_zero() -> None:
    """Scores 14 % either side of the mean share band 0 with the neutral score."""
    tracker = LatencyTracker(WINDOW)
    record_many(tracker, "fast", 0.43, 40)
    record_many(tracker, "slow", 0.57, 40)
    bands = bands_at(tracker, ["fast", "slow", "unsampled"], 1.0)
    assert bands == {"fast": 0, "slow": 0, "unsampled": 0}


def test_provider_forty_percent_slower_than_its_peers_falls_into_a_worse_band() -> None:
    """A provider 40 % slower than its peers smooths to 22 % above the mean: band 1."""
    tracker = LatencyTracker(WINDOW)
    for provider in ("b", "c", "d"):
        record_many(tracker, provider, 0.5, 20)
    record_many(tracker, "a", 0.7, 20)
    bands = bands_at(tracker, ["a", "b", "c", "d"], 1.0)
    assert bands == {"a": 1, "b": 0, "c": 0, "d": 0}


def test_bands_are_zero_when_latency_routing_is_off_for_the_key() -> None:
    """With latency routing disabled every band is 0, whatever the samples say."""
    tracker = tracker_with_average_of_half_a_second(0.2)
    bands = tracker.bands(MODEL, ["a", "c"], 1.0, band_fraction=0.15, min_samples=20, enabled=False)
    assert bands == {"a": 0, "c": 0}


def test_bands_are_zero_below_the_minimum_sample_count() -> None:
    """Fewer samples of the model than `min_samples` in the window keep every band at 0."""
    tracker = LatencyTracker(WINDOW)
    record_many(tracker, "a", 0.1, 10)
    record_many(tracker, "b", 1.0, 9)
    assert bands_at(tracker, ["a", "b"], 1.0) == {"a": 0, "b": 0}
    tracker.record("b", MODEL, 1.0, 1.0)
    assert bands_at(tracker, ["a", "b"], 1.0) == {"a": -2, "b": 2}


@pytest.mark.parametrize("global_mean", [math.inf, -math.inf, math.nan])
def test_band_is_zero_when_the_global_mean_is_not_finite(global_mean: float) -> None:
    """A non-finite global mean turns banding off: every score lands in band 0."""
    assert score_band(0.1, global_mean, 0.15) == 0
    assert score_band(100.0, global_mean, 0.15) == 0


def test_non_finite_samples_never_reach_the_global_mean() -> None:
    """Infinite and NaN durations are dropped, so the mean and bands come from real samples."""
    tracker = LatencyTracker(WINDOW)
    record_many(tracker, "a", math.inf, 30)
    record_many(tracker, "a", math.nan, 30)
    assert bands_at(tracker, ["a", "b"], 1.0) == {"a": 0, "b": 0}
    record_many(tracker, "b", 0.4, 20)
    record_many(tracker, "c", 0.6, 20)
    snapshot = tracker.snapshot(MODEL, 1.0)
    assert snapshot.global_mean_seconds == pytest.approx(0.5)
    assert bands_at(tracker, ["a", "b", "c"], 1.0) == {"a": 0, "b": -1, "c": 1}


def test_samples_longer_than_a_day_count_as_a_day() -> None:
    """An absurd duration is capped, so one bad measurement cannot swamp the totals."""
    tracker = LatencyTracker(WINDOW)
    tracker.record("a", MODEL, 1e308, 0.0)
    assert tracker.snapshot(MODEL, 0.0).global_mean_seconds == pytest.approx(MAX_SAMPLE_SECONDS)


def test_bands_return_to_zero_once_samples_age_out_of_the_window() -> None:
    """When the window slides past the samples, too few remain and every band is 0 again."""
    tracker = LatencyTracker(WINDOW)
    record_many(tracker, "a", 0.1, 20, now=0.0)
    record_many(tracker, "b", 1.0, 20, now=0.0)
    assert bands_at(tracker, ["a", "b"], 1.0) != {"a": 0, "b": 0}
    assert bands_at(tracker, ["a", "b"], WINDOW) == {"a": 0, "b": 0}


def test_unknown_model_has_all_bands_zero() -> None:
    """A model never recorded gives band 0 to every provider asked about."""
    tracker = LatencyTracker(WINDOW)
    assert bands_at(tracker, ["a", "b"], 1.0, model="other") == {"a": 0, "b": 0}


def test_samples_leave_the_window_once_they_are_window_seconds_old() -> None:
    """A sample exactly `window_seconds` old no longer counts; one just younger still does."""
    tracker = LatencyTracker(10.0)
    tracker.record("a", MODEL, 0.5, 0.0)
    tracker.record("a", MODEL, 0.7, 5.0)
    assert tracker.snapshot(MODEL, 9.999).sample_count == 2
    snapshot = tracker.snapshot(MODEL, 10.0)
    assert snapshot.sample_count == 1
    assert snapshot.global_mean_seconds == pytest.approx(0.7)
    assert tracker.snapshot(MODEL, 15.0).sample_count == 0


def test_samples_are_capped_per_series_keeping_the_newest() -> None:
    """Past the per-series cap the oldest sample is dropped, from the global totals too."""
    tracker = LatencyTracker(WINDOW, max_samples_per_series=3)
    for index, ttft in enumerate([9.0, 1.0, 2.0, 3.0]):
        tracker.record("a", MODEL, ttft, float(index))
    snapshot = tracker.snapshot(MODEL, 5.0)
    assert snapshot.sample_count == 3
    assert snapshot.global_mean_seconds == pytest.approx(2.0)
    assert snapshot.providers[0].mean_seconds == pytest.approx(2.0)


@pytest.mark.parametrize("bad_sample", [math.nan, math.inf, -math.inf, -0.1])
def test_non_finite_or_negative_samples_are_ignored(bad_sample: float) -> None:
    """A NaN, infinite or negative duration is not recorded."""
    tracker = LatencyTracker(WINDOW)
    tracker.record("a", MODEL, bad_sample, 0.0)
    assert tracker.snapshot(MODEL, 0.0).sample_count == 0


def test_tolerance_is_at_least_one_millisecond() -> None:
    """With a 2 ms mean, 15 % would be 0.3 ms; the 1 ms floor keeps a 0.5 ms gap in band 0."""
    tracker = LatencyTracker(WINDOW)
    record_many(tracker, "a", 0.0015, 30)
    record_many(tracker, "b", 0.0025, 30)
    assert bands_at(tracker, ["a", "b"], 1.0) == {"a": 0, "b": 0}


def test_snapshot_reports_mean_count_and_band_per_provider() -> None:
    """The status snapshot lists each sampled provider's mean, count and band, plus asked ones."""
    tracker = tracker_with_average_of_half_a_second(0.375)
    snapshot = tracker.snapshot(MODEL, 1.0, providers=["b"])
    summary = {
        entry.provider: (entry.mean_seconds, entry.sample_count, entry.band)
        for entry in snapshot.providers
    }
    assert summary == {
        "a": (pytest.approx(0.375), 20, -1),
        "b": (None, 0, 0),
        "c": (pytest.approx(0.75), 10, 1),
    }
    assert snapshot.banding_active


def test_snapshot_says_banding_is_off_below_the_minimum_sample_count() -> None:
    """With too few samples the snapshot still shows means but every band is 0."""
    tracker = LatencyTracker(WINDOW)
    record_many(tracker, "a", 0.1, 3)
    snapshot = tracker.snapshot(MODEL, 1.0)
    assert not snapshot.banding_active
    assert snapshot.global_mean_seconds == pytest.approx(0.1)
    assert snapshot.providers[0].band == 0
    assert snapshot.providers[0].score_seconds is None


samples_strategy = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.floats(min_value=0.0, max_value=30.0, allow_nan=False),
        st.floats(min_value=0.0, max_value=8.0, allow_nan=False),
    ),
    max_size=60,
)


@given(samples_strategy)
def test_running_totals_match_a_brute_force_recount(
    samples: list[tuple[str, float, float]],
) -> None:
    """Incremental means and counts equal a recount of in-window samples, to the microsecond."""
    window, cap = 20.0, 4
    tracker = LatencyTracker(window, max_samples_per_series=cap)
    retained: dict[str, list[tuple[float, float]]] = {"a": [], "b": [], "c": []}
    now = 0.0
    for provider, ttft, step in samples:
        now += step
        tracker.record(provider, MODEL, ttft, now)
        retained[provider] = [*retained[provider], (now, ttft)][-cap:]
    for series in retained.values():
        series[:] = [(taken_at, ttft) for taken_at, ttft in series if taken_at > now - window]
    snapshot = tracker.snapshot(MODEL, now, min_samples=0)
    values = [ttft for series in retained.values() for _, ttft in series]
    assert snapshot.sample_count == len(values)
    if values:
        assert snapshot.global_mean_seconds == pytest.approx(
            math.fsum(values) / len(values), abs=1e-6
        )
    for entry in snapshot.providers:
        series_values = [ttft for _, ttft in retained[entry.provider]]
        assert entry.sample_count == len(series_values)
        assert entry.mean_seconds == pytest.approx(
            math.fsum(series_values) / len(series_values), abs=1e-6
        )


@given(samples_strategy)
def test_snapshot_bands_agree_with_routing_bands(samples: list[tuple[str, float, float]]) -> None:
    """The status page shows exactly the bands that routing uses."""
    tracker = LatencyTracker(20.0)
    now = 0.0
    for provider, ttft, step in samples:
        now += step
        tracker.record(provider, MODEL, ttft, now)
    providers = ["a", "b", "c", "unsampled"]
    snapshot = tracker.snapshot(MODEL, now, providers=providers, min_samples=3)
    routing = tracker.bands(MODEL, providers, now, band_fraction=0.15, min_samples=3, enabled=True)
    assert {entry.provider: entry.band for entry in snapshot.providers} == routing


def test_forgetting_a_provider_makes_it_neutral_again() -> None:
    """After `forget`, a slow provider scores the global mean (band 0) and totals stay exact."""
    tracker = LatencyTracker(900)
    for index in range(30):
        tracker.record("slow", "m", 0.9, float(index))
        tracker.record("fast", "m", 0.3, float(index))
        tracker.record("mid", "m", 0.5, float(index))
    bands = tracker.bands(
        "m", ["slow", "fast", "mid"], 30.0, band_fraction=0.15, min_samples=20, enabled=True
    )
    assert bands["slow"] > 0
    tracker.forget("slow")
    bands = tracker.bands(
        "m", ["slow", "fast", "mid"], 30.0, band_fraction=0.15, min_samples=20, enabled=True
    )
    assert bands["slow"] == 0
    snapshot = tracker.snapshot("m", 30.0)
    assert snapshot.sample_count == 60
    assert snapshot.global_mean_seconds == pytest.approx(0.4)
