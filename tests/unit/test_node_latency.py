"""The fleet's latency view: node TTFT windows, bands with hysteresis, and private bands' expiry."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.dispatch.load import parse_node_metrics
from gateway.routing.latency import LatencyTracker, held_band
from gateway.routing.node_latency import (
    MIN_FIRST_TOKENS,
    FleetLatency,
    NodeTtft,
    fleet_bands,
    shared_band,
)
from gateway.simulator.engine import TtftHistogram
from gateway.simulator.metrics import metrics_registry, render_metrics
from gateway.simulator.options import SimulatorOptions
from gateway.simulator.state import SimulatorState

MODEL = "llama"


@pytest.mark.parametrize(
    ("position", "previous", "expected"),
    [
        (0.7, 0, 0),  # past the boundary (0.5) but not a quarter band inside band 1
        (0.76, 0, 1),
        (1.6, 0, 1),  # a jump moves as far as it is clearly inside
        (1.8, 0, 2),
        (0.3, 1, 1),
        (0.24, 1, 0),
        (-0.76, 0, -1),
        (-0.6, 0, 0),
        (0.6, None, 1),  # no band yet: plain rounding
        (0.4, None, 0),
    ],
)
def test_a_band_changes_only_once_the_position_is_clearly_inside_another(
    position: float, previous: int | None, expected: int
) -> None:
    """With hysteresis 0.25, a band moves only a quarter band width past the boundary."""
    assert held_band(position, previous, 0.25) == expected


@given(st.floats(-20, 20), st.integers(-20, 20))
def test_without_hysteresis_a_band_is_plain_rounding(position: float, previous: int) -> None:
    """Hysteresis 0 gives the nearest band whatever the previous one (halves aside)."""
    if abs(position - round(position)) != 0.5:
        assert held_band(position, previous, 0.0) == round(position)


@given(st.lists(st.floats(-4.99, 4.99), min_size=1, max_size=50))
def test_noise_inside_a_band_and_its_margins_never_moves_it(noise: list[float]) -> None:
    """Positions less than 0.75 band widths from a band's centre never move a provider out of it."""
    band = 2
    for offset in noise:
        band = held_band(2 + offset * 0.15, band, 0.25)
        assert band == 2


def test_a_node_mean_covers_the_last_window_of_its_counters() -> None:
    """The mean is the growth of the TTFT sum over the growth of the count across the window."""
    node = NodeTtft()
    node.add(0.0, 10.0, 100)  # 0.1 s each before the window
    node.add(5.0, 10.0 + 30 * 0.3, 130)
    node.add(20.0, 10.0 + 30 * 0.3 + 10 * 0.5, 140)
    # At 20 s with a 10 s window: the base is the newest reading at least 10 s old (5 s).
    assert node.mean(20.0, 10.0, 3.0) == pytest.approx(0.5)
    # With a 20 s window the base stays at 0 s: (9 + 5) / 40.
    fresh = NodeTtft()
    fresh.add(0.0, 10.0, 100)
    fresh.add(5.0, 19.0, 130)
    fresh.add(20.0, 24.0, 140)
    assert fresh.mean(20.0, 20.0, 3.0) == pytest.approx(14 / 40)


def test_a_node_without_a_first_token_in_the_window_has_no_figure() -> None:
    """No requests in the window is no figure, never a slow one."""
    node = NodeTtft()
    node.add(0.0, 10.0, 100)
    node.add(11.0, 10.0, 100)
    assert node.mean(11.0, 10.0, 3.0) is None


def test_stale_readings_and_a_restarted_node_give_no_old_figure() -> None:
    """Polls that stopped give no figure; counters that went back start the window afresh."""
    node = NodeTtft()
    node.add(0.0, 1.0, 10)
    node.add(1.0, 2.0, 20)
    assert node.mean(1.0, 10.0, 3.0) == pytest.approx(0.1)
    assert node.mean(5.0, 10.0, 3.0) is None  # last read 4 s ago, 3 s allowed
    node.add(6.0, 0.5, 1)  # the node restarted
    assert node.mean(6.0, 10.0, 3.0) is None
    node.add(7.0, 6.5, 13)
    assert node.mean(7.0, 10.0, 3.0) == pytest.approx(0.5)


def test_a_few_first_tokens_are_not_a_figure() -> None:
    """Fewer than MIN_FIRST_TOKENS in the window say more about the prompts than the node."""
    node = NodeTtft()
    node.add(0.0, 0.0, 0)
    node.add(1.0, 0.9, MIN_FIRST_TOKENS - 1)
    assert node.mean(1.0, 10.0, 3.0) is None
    node.add(2.0, 1.0, MIN_FIRST_TOKENS)
    assert node.mean(2.0, 10.0, 3.0) == pytest.approx(1.0 / MIN_FIRST_TOKENS)


def test_without_the_store_only_a_clearly_slow_node_is_ranked_apart() -> None:
    """Shared bands: 1 from two bands slow on, 0 for everything nearer or faster."""
    assert [shared_band(band) for band in (-3, -1, 0, 1, 2, 5)] == [0, 0, 0, 0, 1, 1]


def test_fleet_bands_compare_each_node_once_against_the_mean_of_nodes() -> None:
    """A node three times slower than its two peers is banded slow; the peers stay in band 0."""
    bands = fleet_bands({"a": 0.1, "b": 0.1, "c": 0.3}, {}, band_fraction=0.15, hysteresis=0.25)
    assert bands == {"a": -1, "b": -1, "c": 3}
    even = fleet_bands({"a": 0.1, "b": 0.104, "c": 0.097}, {}, band_fraction=0.15, hysteresis=0.25)
    assert set(even.values()) == {0}


def test_a_lone_node_figure_is_band_zero() -> None:
    """With one figure there is nothing to compare it with."""
    assert fleet_bands({"a": 5.0}, {}, band_fraction=0.15, hysteresis=0.25)["a"] == 0


def test_fleet_latency_holds_bands_between_poll_rounds() -> None:
    """A node near a boundary keeps the band it had, round after round, until clearly past it."""
    fleet = FleetLatency()
    figures = {"a": 0.1, "b": 0.1, "c": 0.1}
    fleet.update(1, {MODEL: figures}, band_fraction=0.15, hysteresis=0.25)
    assert fleet.bands[MODEL]["c"] == 0
    # Reference (0.1 + 0.1 + 0.125) / 3 = 0.1083; width 0.0325: c sits 0.51 widths up.
    fleet.update(2, {MODEL: {**figures, "c": 0.125}}, band_fraction=0.15, hysteresis=0.25)
    assert fleet.bands[MODEL]["c"] == 0
    fleet.update(3, {MODEL: {**figures, "c": 0.3}}, band_fraction=0.15, hysteresis=0.25)
    assert fleet.bands[MODEL]["c"] == 2
    fleet.update(4, {MODEL: figures}, band_fraction=0.15, hysteresis=0.25)
    assert fleet.bands[MODEL]["c"] == 0
    assert fleet.polls == 4


def test_the_metrics_page_parser_reads_load_and_ttft_totals() -> None:
    """Running + waiting and the TTFT histogram's sum and count, summed over label sets."""
    page = "\n".join(
        [
            "# HELP vllm:time_to_first_token_seconds Histogram of time to first token.",
            'vllm:num_requests_running{model_name="m",engine="0"} 3.0',
            'vllm:num_requests_waiting{model_name="m",engine="0"} 2.0',
            'vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 4.0',
            'vllm:time_to_first_token_seconds_sum{model_name="m",engine="0"} 1.5',
            'vllm:time_to_first_token_seconds_sum{model_name="n",engine="0"} 0.5',
            'vllm:time_to_first_token_seconds_count{model_name="m",engine="0"} 10.0',
            'vllm:time_to_first_token_seconds_count{model_name="n",engine="0"} 5.0',
            "vllm:time_to_first_token_seconds_created 1.7e9",
        ]
    )
    figures = parse_node_metrics(page)
    assert (figures.load, figures.ttft_seconds, figures.ttft_count) == (5.0, 2.0, 15.0)
    sglang = parse_node_metrics(
        "sglang:time_to_first_token_seconds_sum 3.0\nsglang:time_to_first_token_seconds_count 6\n"
    )
    assert (sglang.load, sglang.ttft_seconds, sglang.ttft_count) == (None, 3.0, 6.0)


def test_the_simulator_publishes_a_ttft_histogram_the_poller_reads() -> None:
    """The simulator's `/metrics` page carries vLLM's TTFT histogram, totals included."""
    state = SimulatorState(SimulatorOptions(name="node-a"))
    histogram: TtftHistogram = state.engine.ttft
    histogram.observe(0.05)
    histogram.observe(0.15)
    page = render_metrics(metrics_registry(state)).decode()
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1"' in page
    figures = parse_node_metrics(page)
    assert figures.ttft_count == 2
    assert figures.ttft_seconds == pytest.approx(0.2)


def test_a_private_series_without_a_sample_for_the_maximum_age_is_dropped() -> None:
    """A provider banded slow on its own samples is average again once it has none for a while,
    and its new samples are not mixed with the old slow ones."""
    tracker = LatencyTracker(900.0, max_age_seconds=60.0)
    for _ in range(30):
        tracker.record("a", MODEL, 0.1, 0.0)
        tracker.record("b", MODEL, 0.1, 0.0)
        tracker.record("c", MODEL, 1.0, 0.0)

    def bands(now: float) -> dict[str, int]:
        return tracker.bands(
            MODEL, ["a", "b", "c"], now, band_fraction=0.15, min_samples=20, enabled=True
        )

    assert bands(30.0)["c"] > 0
    for _ in range(30):  # a and b go on being used; c gets nothing
        tracker.record("a", MODEL, 0.1, 50.0)
        tracker.record("b", MODEL, 0.1, 50.0)
    assert bands(61.0) == {"a": 0, "b": 0, "c": 0}
    tracker.record("c", MODEL, 0.1, 62.0)  # recovered: one fast sample, nothing old beside it
    assert bands(62.0)["c"] == 0


def test_private_bands_hold_with_hysteresis() -> None:
    """A provider's own-sample band does not flap on scores that graze a boundary."""

    def band_of_b(tracker: LatencyTracker, hysteresis: float) -> int:
        return tracker.bands(
            MODEL,
            ["a", "b"],
            1.0,
            band_fraction=0.15,
            min_samples=20,
            enabled=True,
            hysteresis=hysteresis,
        )["b"]

    held, plain = LatencyTracker(900.0), LatencyTracker(900.0)
    for tracker in (held, plain):
        for _ in range(200):
            tracker.record("a", MODEL, 0.1, 0.0)
        for _ in range(40):
            tracker.record("b", MODEL, 0.1, 0.0)
        assert band_of_b(tracker, 0.25) == 0
        for _ in range(15):  # b's score is now 0.62 band widths above the mean
            tracker.record("b", MODEL, 0.2, 0.5)
    assert band_of_b(held, 0.25) == 0
    assert band_of_b(plain, 0.0) == 1
    for _ in range(40):  # 1.05 band widths up: clearly in band 1
        held.record("b", MODEL, 0.2, 0.5)
    assert band_of_b(held, 0.25) == 1
