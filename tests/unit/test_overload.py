"""The load shedder: a CoDel-style controller whose target is the burst allowance, on each
request's queueing delay, driven by a fake clock; and what the gate counts as sheddable."""

from __future__ import annotations

import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.catalog import Catalog
from gateway.config import Settings
from gateway.config_loading import parse_config
from gateway.dispatch.permits import KeyLimits
from gateway.edge.endpoints import ENDPOINTS
from gateway.edge.overload import (
    LIGHT_LEVELS,
    MIN_SAMPLES,
    LoadShedder,
    OverloadGate,
    SheddingPolicy,
)
from tests.support.gateway import settings_dict

BURST = 1.0
POLICY = SheddingPolicy(burst=BURST)
INTERVAL = POLICY.interval
LEVEL = POLICY.level
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
) -> LoadShedder:
    """A shedder with a 1 s burst allowance."""
    return LoadShedder(
        SheddingPolicy(burst=BURST, enabled=enabled),
        clock=clock,
        on_shed=(lambda: counted.append(1)) if counted is not None else None,
        on_interval=published.append if published is not None else None,
    )


def served(shedding: LoadShedder, delay: float, *, light: bool = False) -> bool:
    """Whether a sheddable request with this delay is served."""
    return shedding.admits(delay) or not shedding.refuses(delay, light=lambda: light)


def arrive(shedding: LoadShedder, clock: FakeClock, delays: list[float]) -> list[bool]:
    """Sheddable requests with these queueing delays arrive `GAP` apart; whether each was
    served."""
    admitted = []
    for delay in delays:
        clock.now += GAP
        admitted.append(served(shedding, delay))
    return admitted


def overload(shedding: LoadShedder, clock: FakeClock) -> None:
    """Requests queued past the allowance for a whole interval: the worker becomes
    overloaded."""
    arrive(shedding, clock, [BURST * 1.2] * (int(INTERVAL / GAP) + MIN_SAMPLES))
    assert shedding.overloaded


def test_a_burst_that_drains_within_the_allowance_is_never_refused() -> None:
    """A burst's queue rising to the allowance and draining, however many requests and for
    however long each interval is late past the level, refuses nothing."""
    clock = FakeClock()
    shedding = shedder(clock)
    rising = [BURST * step / 1000 for step in range(1001)]
    assert all(arrive(shedding, clock, rising + rising[::-1]))
    assert not shedding.overloaded
    assert shedding.shed == 0


def test_a_standing_queue_past_the_allowance_is_an_overload_that_refuses_the_late() -> None:
    """Once every request queued past the allowance for an interval, a request that queued past
    the shedding level is refused and one within it served; requests that are not sheddable
    never meet `refuses`."""
    clock = FakeClock()
    counted: list[int] = []
    shedding = shedder(clock, counted=counted)
    assert all(arrive(shedding, clock, [BURST * 1.2] * (int(INTERVAL / GAP) - 1)))
    assert not shedding.overloaded  # not yet a whole interval
    overload(shedding, clock)
    before = shedding.shed
    assert not served(shedding, LEVEL * 1.5)
    assert served(shedding, LEVEL * 0.5)
    assert shedding.admits(LEVEL * 0.5)
    assert not shedding.admits(BURST * 3)
    assert shedding.shed == before + 1
    assert len(counted) == shedding.shed


def test_a_request_back_under_the_level_breaks_the_run() -> None:
    """Late requests with one back under the level among them are a passing queue: no
    overload, however long it goes on."""
    clock = FakeClock()
    shedding = shedder(clock)
    pattern = [BURST * 1.5] * int(INTERVAL / GAP / 2) + [LEVEL / 2]
    assert all(arrive(shedding, clock, pattern * 20))
    assert not shedding.overloaded


def test_a_light_key_may_wait_longer_before_it_is_refused() -> None:
    """While overloaded, a light key's request is served up to `LIGHT_LEVELS` levels."""
    clock = FakeClock()
    shedding = shedder(clock)
    overload(shedding, clock)
    within = LEVEL * (LIGHT_LEVELS - 0.5)
    assert served(shedding, within, light=True)
    assert not served(shedding, within, light=False)
    assert not served(shedding, LEVEL * (LIGHT_LEVELS + 0.5), light=True)


def test_the_overload_ends_after_an_interval_without_a_request_past_the_level() -> None:
    """A whole interval in which no request waited past the level ends the overload, and the
    next one is a new episode; requests between the level and the allowance keep it."""
    clock = FakeClock()
    shedding = shedder(clock)
    overload(shedding, clock)
    arrive(shedding, clock, [LEVEL * 1.5] * (int(INTERVAL / GAP) * 3))
    assert shedding.overloaded
    arrive(shedding, clock, [0.001] * (int(INTERVAL / GAP) * 2 + 2))
    assert not shedding.overloaded
    assert served(shedding, BURST * 0.9)
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
    assert published[-1] == BURST * 1.2
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
    assert shedding.admits(BURST * 10)
    assert shedding.shed == 0


def gate() -> OverloadGate:
    """A gate over an app with the proxied routes and a health route, overloaded."""
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    for spec in ENDPOINTS:
        app.router.add_route(spec.method, spec.path, handler)
    app.router.add_get("/healthz", handler)
    clock = FakeClock()
    shedding = shedder(clock)
    overload(shedding, clock)
    return OverloadGate(shedding, router=app.router, light=lambda _: False, request_id=lambda: "r")


@pytest.mark.parametrize(
    ("method", "path", "sheddable"),
    [
        ("POST", "/v1/chat/completions", True),
        ("POST", "/v1/chat/%63ompletions", True),
        ("POST", "/v1/%63hat/completions?x=1", True),
        ("POST", "/v1/embeddings", True),
        ("GET", "/v1/responses/resp_1", True),
        ("DELETE", "/v1/responses/%72esp_1", True),
        ("GET", "/healthz", False),
        ("GET", "/%68ealthz", False),
        ("GET", "/v1/chat/completions", False),  # 405: no proxied route
        ("POST", "/v1/chat/completions/x", False),  # 404
    ],
)
async def test_sheddable_requests_are_told_by_the_route_the_router_matches(
    method: str, path: str, sheddable: bool
) -> None:
    """Whether a request is sheddable follows the route the app's router matches after its own
    decoding of the path, so a percent-encoded proxied path is shed like the plain one."""
    overloaded = gate()
    request = make_mocked_request(method, path)
    assert await overloaded.sheddable(request) is sheddable
    refusal = await overloaded.admit(request, BURST * 2)
    assert (refusal is not None) is sheddable
    if refusal is not None:
        assert refusal.status == 503
        assert refusal.headers["Retry-After"] == "1"


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
    """A config that does not mention load shedding gets it, with a 1 s burst allowance."""
    server = Settings.model_validate(settings_dict({"a": "http://127.0.0.1:1"})).server
    assert server.load_shedding
    assert server.load_shedding_burst_seconds == 1.0


@pytest.mark.parametrize(
    "old",
    ["load_shedding_target_lag_ms", "load_shedding_target_delay_ms", "load_shedding_interval_ms"],
)
def test_the_old_shedding_settings_load_with_a_warning_naming_their_replacement(old: str) -> None:
    """A config with a shedding setting of earlier builds still loads (an upgrade never stops a
    gateway over it), with a warning at its path naming `load_shedding_burst_seconds`."""
    config = settings_dict({"a": "http://127.0.0.1:1"})
    config["server"] = {old: 10}
    loaded = parse_config(yaml.safe_dump(config), {})
    assert loaded.settings.server.load_shedding_burst_seconds == 1.0
    (warning,) = [problem for problem in loaded.warnings if problem.path == f"server.{old}"]
    assert "load_shedding_burst_seconds" in warning.message
