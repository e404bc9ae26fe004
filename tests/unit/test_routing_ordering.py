"""Ordering a request's candidates: each rule of the sort key, fairness loops, and properties."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from hypothesis import given
from hypothesis import strategies as st

from gateway.routing.latency import LatencyTracker
from gateway.routing.ordering import (
    ONLY_REASON,
    REASONS,
    OrderingRequest,
    ProviderState,
    Ranked,
    StartTracker,
    order,
    tiebreak_ranks,
)
from gateway.routing.preferences import active_providers, preferred_set

MODEL = "llama"
WINDOW = 900.0


def bands_at(
    tracker: LatencyTracker, providers: Sequence[str], now: float, *, model: str = MODEL
) -> dict[str, int]:
    """Return the bands with the default settings: 15 % tolerance, at least 20 samples."""
    return tracker.bands(model, providers, now, band_fraction=0.15, min_samples=20, enabled=True)


def state(
    name: str,
    *,
    identity: str | None = None,
    cooling: bool = False,
    available: bool = True,
    band: int = 0,
    last_started: float | None = None,
    tiebreak: int = 0,
) -> ProviderState:
    """Return a candidate with neutral defaults: available, band 0, never started."""
    return ProviderState(
        name=name,
        routing_identity=identity or name,
        cooling=cooling,
        available=available and not cooling,
        band=band,
        last_started=last_started,
        tiebreak=tiebreak,
    )


def names(ranked: Sequence[Ranked]) -> list[str]:
    """Return the provider names of a ranking, in order."""
    return [entry.provider for entry in ranked]


def test_cooling_providers_go_last_even_when_sticky_or_preferred() -> None:
    """A cooling provider ranks after every other one, whatever else it has going for it."""
    request = OrderingRequest(
        candidates=[state("a", cooling=True, band=-3), state("b", band=2)],
        preferred=frozenset({"a", "b"}),
        sticky="a",
    )
    assert order(request) == [Ranked("b", ONLY_REASON), Ranked("a", "cooling")]


def test_active_preference_ranks_preferred_providers_first() -> None:
    """Preferred providers come before better-banded, never-started others."""
    request = OrderingRequest(
        candidates=[state("a", band=-2), state("b", last_started=5.0), state("c", band=-1)],
        preferred=frozenset({"b"}),
    )
    assert order(request) == [
        Ranked("b", "preferred"),
        Ranked("a", "preferred"),
        Ranked("c", "band"),
    ]


def test_preference_outranks_stickiness() -> None:
    """A sticky target outside the active preferred set is ignored, not just ranked second."""
    request = OrderingRequest(
        candidates=[state("a", tiebreak=2), state("b", tiebreak=1), state("c", tiebreak=0)],
        preferred=frozenset({"b"}),
        sticky="a",
    )
    assert names(order(request)) == ["b", "c", "a"]


def test_sticky_target_inside_the_preferred_set_is_first() -> None:
    """When the sticky provider is preferred, it leads the preferred ones."""
    request = OrderingRequest(
        candidates=[state("a", band=-1), state("b"), state("c")],
        preferred=frozenset({"b", "c"}),
        sticky="c",
    )
    assert order(request)[0] == Ranked("c", "sticky")


def test_empty_preferred_set_keeps_stickiness() -> None:
    """A preference whose set is empty is inactive, so the sticky target still leads."""
    request = OrderingRequest(
        candidates=[state("a", band=-1), state("b")],
        preferred=frozenset(),
        sticky="b",
    )
    assert order(request)[0] == Ranked("b", "sticky")


def test_unavailable_preferred_set_keeps_stickiness() -> None:
    """Preferred providers that are all busy make the preference inactive: stickiness holds."""
    request = OrderingRequest(
        candidates=[state("a"), state("b", available=False), state("c", tiebreak=-1)],
        preferred=frozenset({"b"}),
        sticky="a",
    )
    assert names(order(request)) == ["a", "c", "b"]


def test_preferred_providers_all_cooling_fall_back_softly_to_the_others() -> None:
    """With every preferred provider cooling, the others serve and the preferred go last."""
    request = OrderingRequest(
        candidates=[state("a", cooling=True), state("b", cooling=True), state("c"), state("d")],
        preferred=frozenset({"a", "b"}),
    )
    ranked = order(request)
    assert names(ranked)[:2] == ["c", "d"]
    assert [entry.reason for entry in ranked[2:]] == ["cooling", "cooling"]


def test_missing_group_preference_is_skipped_and_ordering_is_unchanged() -> None:
    """A preference naming a missing group prefers nobody: the sticky target still leads."""
    candidates = [state("a", band=-1), state("b")]
    preferred = preferred_set({MODEL: "ghost-group"}, {}, MODEL, ["a", "b"])
    request = OrderingRequest(
        candidates=candidates,
        preferred=active_providers(preferred, {"a", "b"}),
        sticky="b",
    )
    assert request.preferred is None
    assert order(request)[0] == Ranked("b", "sticky")


def test_sticky_target_leads_when_not_spilled() -> None:
    """The bound provider comes first even with a worse band and a recent start."""
    request = OrderingRequest(
        candidates=[state("a", band=-1), state("b", band=1, last_started=9.0)],
        sticky="b",
    )
    assert order(request) == [Ranked("b", "sticky"), Ranked("a", "sticky")]


def test_spilled_request_ignores_the_sticky_target() -> None:
    """A spilled request orders as if unbound: the better band leads."""
    request = OrderingRequest(
        candidates=[state("a", band=-1), state("b", band=1)], sticky="b", spilled=True
    )
    assert names(order(request)) == ["a", "b"]


def test_new_session_goes_to_the_routing_identity_with_fewest_sessions() -> None:
    """`a` and `b` alias one identity with 3 sessions, `c` has none: the new session goes to `c`."""
    request = OrderingRequest(
        candidates=[
            state("a", identity="account-7", band=-1),
            state("b", identity="account-7", band=-1),
            state("c", band=0, last_started=50.0),
        ],
        new_session=True,
        session_counts={"account-7": 3},
    )
    assert order(request)[0] == Ranked("c", "fewest-sessions")


def test_session_counts_are_ignored_for_requests_that_are_not_new_sessions() -> None:
    """Without a new session, counts play no part and the better band leads."""
    request = OrderingRequest(
        candidates=[state("a", identity="account-7", band=-1), state("c")],
        new_session=False,
        session_counts={"account-7": 3},
    )
    assert order(request)[0] == Ranked("a", "band")


def test_lower_band_beats_an_older_start() -> None:
    """Latency band is decided before least-recently-started."""
    request = OrderingRequest(
        candidates=[state("a", last_started=1.0), state("b", band=-1, last_started=99.0)]
    )
    assert order(request) == [Ranked("b", "band"), Ranked("a", "band")]


def test_never_started_identity_comes_before_one_started_long_ago() -> None:
    """Within a band, never started beats started, and an older start beats a newer one."""
    request = OrderingRequest(
        candidates=[
            state("recent", last_started=20.0),
            state("older", last_started=10.0),
            state("never", tiebreak=9),
        ]
    )
    assert order(request) == [
        Ranked("never", "least-recent"),
        Ranked("older", "least-recent"),
        Ranked("recent", "least-recent"),
    ]


def test_tiebreak_decides_when_everything_else_is_equal() -> None:
    """Identical candidates are ordered by their per-process tiebreak rank."""
    request = OrderingRequest(candidates=[state("a", tiebreak=1), state("b", tiebreak=0)])
    assert order(request) == [Ranked("b", "tiebreak"), Ranked("a", "tiebreak")]


def test_single_candidate_is_ranked_as_the_only_one() -> None:
    """A lone candidate leads with reason "only"; an empty request orders to nothing."""
    assert order(OrderingRequest(candidates=[state("a")])) == [Ranked("a", ONLY_REASON)]
    assert order(OrderingRequest(candidates=[])) == []


def test_tiebreak_ranks_are_a_permutation_fixed_by_the_seed() -> None:
    """Ranks are 0..n-1 over distinct names, identical for one seed, varying across seeds."""
    providers = [f"gpu-{index}" for index in range(8)]
    ranks = tiebreak_ranks([*providers, "gpu-0"], seed=7)
    assert sorted(ranks) == sorted(providers)
    assert sorted(ranks.values()) == list(range(8))
    assert tiebreak_ranks(providers, seed=7) == ranks
    assert len({tuple(tiebreak_ranks(providers, seed).items()) for seed in range(10)}) > 1


def test_start_tracker_remembers_the_latest_start_per_identity() -> None:
    """An identity never started reports None; otherwise its latest start time."""
    starts = StartTracker()
    assert starts.last_started("account-7") is None
    starts.record("account-7", 3.0)
    starts.record("account-7", 8.0)
    assert starts.last_started("account-7") == 8.0


def winners_over_requests(
    tracker: LatencyTracker,
    providers: Sequence[str],
    requests: int,
    *,
    starts: StartTracker,
    start_at: float,
    tiebreaks: Mapping[str, int],
) -> list[str]:
    """Route `requests` requests one after another, recording a start for each winner."""
    winners = []
    for step in range(requests):
        now = start_at + step
        bands = bands_at(tracker, providers, now)
        candidates = [
            state(
                name,
                band=bands[name],
                last_started=starts.last_started(name),
                tiebreak=tiebreaks[name],
            )
            for name in providers
        ]
        winner = order(OrderingRequest(candidates=candidates))[0].provider
        starts.record(winner, now)
        winners.append(winner)
    return winners


def test_near_average_provider_alternates_with_an_unsampled_one() -> None:
    """Global 500 ms, `a` smoothed to 436 ms ties with unsampled `b` in band 0: they alternate."""
    tracker = LatencyTracker(WINDOW)
    for _ in range(20):
        tracker.record("a", MODEL, 0.42, 0.0)
    for _ in range(10):
        tracker.record("c", MODEL, 0.66, 0.0)
    winners = winners_over_requests(
        tracker,
        ["a", "b", "c"],
        10,
        starts=StartTracker(),
        start_at=1.0,
        tiebreaks={"a": 0, "b": 1, "c": 2},
    )
    assert winners == ["a", "b"] * 5


def test_slow_provider_loses_until_its_samples_age_out() -> None:
    """A provider 40 % slower than its peers never wins, then shares again once samples expire."""
    tracker = LatencyTracker(WINDOW)
    for provider in ("b", "c", "d"):
        for _ in range(20):
            tracker.record(provider, MODEL, 0.5, 0.0)
    for _ in range(20):
        tracker.record("a", MODEL, 0.7, 0.0)
    starts = StartTracker()
    tiebreaks = {"a": 0, "b": 1, "c": 2, "d": 3}
    providers = ["a", "b", "c", "d"]
    slow = winners_over_requests(
        tracker, providers, 12, starts=starts, start_at=1.0, tiebreaks=tiebreaks
    )
    assert "a" not in slow
    assert set(slow) == {"b", "c", "d"}
    recovered = winners_over_requests(
        tracker, providers, 8, starts=starts, start_at=WINDOW, tiebreaks=tiebreaks
    )
    assert recovered.count("a") == 2


def test_slow_provider_wins_again_once_fast_samples_pull_it_back() -> None:
    """New fast samples bring the slow provider's score back into band 0 and into rotation."""
    tracker = LatencyTracker(WINDOW)
    for provider in ("b", "c", "d"):
        for _ in range(20):
            tracker.record(provider, MODEL, 0.5, 0.0)
    for _ in range(20):
        tracker.record("a", MODEL, 0.7, 0.0)
    providers = ["a", "b", "c", "d"]
    tiebreaks = {"a": 0, "b": 1, "c": 2, "d": 3}
    assert bands_at(tracker, providers, 1.0)["a"] == 1
    for _ in range(40):
        tracker.record("a", MODEL, 0.5, 1.0)
    winners = winners_over_requests(
        tracker, providers, 8, starts=StartTracker(), start_at=2.0, tiebreaks=tiebreaks
    )
    assert winners.count("a") == 2


@st.composite
def ordering_requests(draw: st.DrawFn) -> OrderingRequest:
    """Draw a request with up to 12 uniquely named candidates and arbitrary routing signals."""
    provider_names = draw(st.lists(st.sampled_from("abcdefghijkl"), unique=True, max_size=12))
    identities = {name: draw(st.sampled_from(["x", "y", "z", name])) for name in provider_names}
    tiebreaks = draw(st.permutations(range(len(provider_names))))
    candidates = [
        ProviderState(
            name=name,
            routing_identity=identities[name],
            cooling=draw(st.booleans()),
            available=draw(st.booleans()),
            band=draw(st.integers(min_value=-3, max_value=3)),
            last_started=draw(st.none() | st.floats(min_value=0, max_value=100)),
            tiebreak=tiebreak,
        )
        for name, tiebreak in zip(provider_names, tiebreaks, strict=True)
    ]
    candidate_names = st.sampled_from(provider_names) if provider_names else st.nothing()
    return OrderingRequest(
        candidates=candidates,
        preferred=draw(st.none() | st.frozensets(candidate_names)),
        sticky=draw(st.none() | candidate_names | st.just("not-a-candidate")),
        spilled=draw(st.booleans()),
        new_session=draw(st.booleans()),
        session_counts=draw(st.dictionaries(st.sampled_from(["x", "y", "z"]), st.integers(0, 20))),
    )


@given(ordering_requests())
def test_ordering_is_a_permutation_of_the_candidates(request: OrderingRequest) -> None:
    """Every candidate appears exactly once in the ranking."""
    ranked = order(request)
    assert sorted(names(ranked)) == sorted(state.name for state in request.candidates)


@given(ordering_requests())
def test_no_cooling_provider_precedes_a_non_cooling_one(request: OrderingRequest) -> None:
    """Cooling providers form the tail of the ranking, each with reason "cooling"."""
    cooling = {state.name for state in request.candidates if state.cooling}
    flags = [entry.provider in cooling for entry in order(request)]
    assert flags == sorted(flags)
    assert all(
        (entry.reason == "cooling") == (entry.provider in cooling) for entry in order(request)
    )


@given(ordering_requests(), st.randoms(use_true_random=False))
def test_ordering_is_deterministic_for_fixed_state_and_seed(
    request: OrderingRequest, shuffler: random.Random
) -> None:
    """The same state gives the same ranking, whatever order the candidates arrive in."""
    shuffled = list(request.candidates)
    shuffler.shuffle(shuffled)
    reordered = OrderingRequest(
        candidates=shuffled,
        preferred=request.preferred,
        sticky=request.sticky,
        spilled=request.spilled,
        new_session=request.new_session,
        session_counts=request.session_counts,
    )
    assert order(request) == order(request)
    assert names(order(reordered)) == names(order(request))


@given(ordering_requests())
def test_a_usable_sticky_target_always_leads(request: OrderingRequest) -> None:
    """A sticky target that is a candidate, not cooling, not spilled and not outranked leads."""
    by_name = {state.name: state for state in request.candidates}
    sticky = by_name.get(request.sticky or "")
    preferred = request.preferred or frozenset()
    preference_active = any(
        state.available and not state.cooling and state.name in preferred
        for state in request.candidates
    )
    outranked = preference_active and sticky is not None and sticky.name not in preferred
    if sticky is None or sticky.cooling or request.spilled or outranked:
        return
    assert order(request)[0].provider == sticky.name


@given(ordering_requests())
def test_every_reason_names_a_rule(request: OrderingRequest) -> None:
    """Reasons are drawn from the rule names, plus "only" for an unopposed leader."""
    assert {entry.reason for entry in order(request)} <= {*REASONS, ONLY_REASON}


def test_tiebreak_ranks_spread_first_picks_across_processes() -> None:
    """With all else equal, processes started with different seeds put different providers first."""
    providers = [f"gpu-{index}" for index in range(6)]
    firsts = set()
    for process_seed in range(20):
        ranks = tiebreak_ranks(providers, seed=process_seed)
        candidates = [state(name, tiebreak=ranks[name]) for name in providers]
        firsts.add(order(OrderingRequest(candidates=candidates))[0].provider)
    assert len(firsts) > 1
