"""Load shedding: a worker refuses new requests only under sustained overload, never a burst.

The signal is each request's *queueing delay*: the wall-clock time between the moment the worker
read the end of the request's head (`GuardedRequestHandler` stamps it) and the moment its
handler starts, that is, how long it waited behind the worker's other work. A worker that keeps
up starts a handler within a fraction of a millisecond; the delay only grows when more work is
ready than the loop gets through. Idle streams add nothing to it.

An upstream answer takes 0.1 to 100 s, so a queue of a few hundred milliseconds is noise to a
client, while a refusal costs it a retry and often a visible error. So the policy has one figure,
the *burst allowance* `burst` (`server.load_shedding_burst_seconds`, 1 s by default), and the
rule is CoDel's, with the allowance as its target:

- A request that queued no longer than the allowance is never refused while the worker is not
  overloaded. A burst whose queue drains within the allowance is therefore served whole,
  however large (200 requests at once cost a worker a few tens of milliseconds).
- The worker becomes *overloaded* when requests keep queueing longer than the allowance for a
  whole `interval` (a tenth of the allowance; at least `MIN_SAMPLES` late requests, and none in
  between back under the shedding level): a standing queue, not a transient one. Only load
  beyond the worker's capacity that does not stop makes one. Clients that wait for each answer
  before sending the next (a closed loop) cannot: they queue at most one request each, and the
  worker's connection cap (1,024) of ~0.3 ms requests is ~0.3 s of queue.
- While overloaded, a new proxied request that queued longer than the *shedding level*
  (`SHED_LEVEL` of the allowance) is answered a prompt 503 `overloaded` with `Retry-After`; a
  *light* key's request (one with fewer requests in flight on the worker than the mean of the
  keys that have some) only past `LIGHT_LEVELS` times it, so a key that floods takes more of the
  refusals. That drains the standing queue down to the level and holds it there for as long as
  the excess lasts. The level sits well under the allowance because a request's time in the
  worker is a few times its measured delay: before its head is read it waits in the kernel for
  the loop's next turn, and its answer waits for another. Requests already admitted are never
  cut.
- The overload ends after a whole interval in which no request queued longer than the level:
  the excess is gone and the queue drained.

The controller always runs, so the delay is published as a metric even with shedding off; then
it only reports, and refuses nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from aiohttp import web

from gateway.edge.endpoints import ENDPOINTS
from gateway.edge.errors import error_body

logger = structlog.get_logger("gateway.edge.overload")

# At least this many late requests in a row make an overload: a few late ones are not a queue.
MIN_SAMPLES = 4
# The interval over which a queue must stand, as a share of the burst allowance.
INTERVAL_SHARE = 0.1
# While overloaded, requests that queued longer than this share of the allowance are refused.
SHED_LEVEL = 0.25
# ... and a light key's, longer than this many levels.
LIGHT_LEVELS = 2.0
# Seconds a shed request is told to wait.
RETRY_AFTER_SECONDS = 1
OVERLOADED_BODY = error_body(503, "This gateway worker is overloaded; retry shortly.", "overloaded")
# The proxied routes, as the app's router matches them: method and resource pattern.
SHEDDABLE_ROUTES = frozenset((spec.method, spec.path) for spec in ENDPOINTS)


@dataclass(frozen=True)
class SheddingPolicy:
    """When a worker counts as overloaded (see the module's description), and whether it then
    refuses requests (`enabled`) or only reports."""

    burst: float  # seconds of queueing a burst may build without any refusal
    enabled: bool = True

    @property
    def interval(self) -> float:
        """Seconds a queue past the allowance must stand to be an overload."""
        return self.burst * INTERVAL_SHARE

    @property
    def level(self) -> float:
        """While overloaded, requests that queued longer than this (seconds) are refused."""
        return self.burst * SHED_LEVEL


class LoadShedder:
    """The overload controller of one worker: it sees each request's delay and decides its
    admission."""

    def __init__(
        self,
        policy: SheddingPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_shed: Callable[[], None] | None = None,
        on_interval: Callable[[float], None] | None = None,
    ) -> None:
        self.policy = policy
        self.overloaded = False
        self.delay = 0.0  # the smallest queueing delay of the last whole interval, seconds
        self.shed = 0  # requests refused so far
        self.episodes = 0  # times the worker became overloaded
        self._clock = clock
        self._on_shed = on_shed
        self._on_interval = on_interval
        self._window_started = clock()
        self._window_smallest = math.inf
        self._window_samples = 0
        self._window_late = False  # a request of this interval queued past the level
        self._late_since: float | None = None  # when the current run of late requests began
        self._late_run = 0  # late requests in that run
        self._episode_shed = 0

    @property
    def shedding(self) -> bool:
        """Whether new requests that queued past the level are refused now."""
        return self.overloaded and self.policy.enabled

    def admits(self, delay: float) -> bool:
        """Count one request's queueing delay (seconds); whether it is served whatever it is.

        False means it is refused if it is sheddable: ask `refuses`.
        """
        self.observe(delay)
        return delay <= self.policy.level or not self.shedding

    def refuses(self, delay: float, *, light: Callable[[], bool]) -> bool:
        """For a sheddable request `admits` did not pass: whether it is refused (counted).
        `light` (asked only when it matters) tells whether its key is light."""
        if delay <= self.policy.level * LIGHT_LEVELS and light():
            return False
        self.shed += 1
        self._episode_shed += 1
        if self._on_shed is not None:
            self._on_shed()
        return True

    def observe(self, delay: float) -> None:
        """Count one request's queueing delay: a run of requests late past the allowance that
        lasts a whole interval makes the worker overloaded."""
        now = self._clock()
        policy = self.policy
        if now - self._window_started >= policy.interval:
            self.tick()
        self._window_smallest = min(self._window_smallest, delay)
        self._window_samples += 1
        if delay <= policy.level:
            self._late_since = None
            return
        self._window_late = True
        if delay <= policy.burst or self.overloaded:
            return
        if self._late_since is None:
            self._late_since = now
            self._late_run = 0
        self._late_run += 1
        if self._late_run >= MIN_SAMPLES and now - self._late_since >= policy.interval:
            self.overloaded = True
            self.episodes += 1
            self._episode_shed = 0
            self._late_since = None
            logger.warning(
                "overloaded", delay_ms=round(delay * 1000, 1), shedding=self.policy.enabled
            )

    def tick(self) -> None:
        """Judge the current interval if it is over (called per request, and by a timer so an
        idle worker's figures settle too)."""
        now = self._clock()
        if now - self._window_started < self.policy.interval:
            return
        self.delay = self._window_smallest if self._window_samples else 0.0
        if self.overloaded and not self._window_late:
            self.overloaded = False
            logger.info("overload_ended", shed=self._episode_shed)
        self._window_started = now
        self._window_smallest = math.inf
        self._window_samples = 0
        self._window_late = False
        if self._on_interval is not None:
            self._on_interval(self.delay)


class OverloadGate:
    """Where a request meets the shedder: as its handler is about to start, before the app
    routes it. A refused request gets a prebuilt OpenAI-shaped 503 with `Retry-After`; its body
    is never read and nothing about it is logged, so a refusal costs a small part of an answer.

    Only new proxied requests are sheddable, as the app's router matches them (after its own
    decoding of the path: `/v1/chat/%63ompletions` is chat): health, readiness, metrics, admin,
    the model list and the status page always reach the app.
    """

    def __init__(
        self,
        shedder: LoadShedder,
        *,
        router: web.UrlDispatcher,
        light: Callable[[web.BaseRequest], bool],
        request_id: Callable[[], str],
    ) -> None:
        self.shedder = shedder
        self._router = router
        self._light = light
        self._request_id = request_id

    async def admit(self, request: web.BaseRequest, delay: float) -> web.Response | None:
        """None to serve the request, or the 503 to answer instead; `delay`: seconds since its
        head was read."""
        shedder = self.shedder
        if (
            shedder.admits(delay)
            or not await self.sheddable(request)
            or not shedder.refuses(delay, light=lambda: self._light(request))
        ):
            return None
        return web.Response(
            status=503,
            body=OVERLOADED_BODY,
            content_type="application/json",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS), "x-request-id": self._request_id()},
        )

    async def sheddable(self, request: web.BaseRequest) -> bool:
        """Whether the app's router matches the request to a proxied endpoint."""
        match = await self._router.resolve(request)  # type: ignore[arg-type]
        if match.http_exception is not None:
            return False
        route = match.route
        resource = route.resource
        return resource is not None and (route.method, resource.canonical) in SHEDDABLE_ROUTES
