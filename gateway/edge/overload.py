"""Load shedding: past its capacity a worker answers new requests a prompt 503, not a queue.

The signal is each request's *queueing delay*: the event loop's own CPU time spent between the
moment the worker read the end of the request's head (`GuardedRequestHandler` stamps it) and the
moment its handler starts, that is the work the worker did for others while this request
waited. A worker that keeps up starts a handler within a fraction of a millisecond; the delay
only grows when more work is ready than the loop gets through, which is a real queue. Thousands
of idle streams add nothing to it, and, being CPU time of the loop's own thread, neither does
CPU that other processes take from the worker (shedding would not give it back).

As in CoDel, a burst is not an overload: only when every request for a whole `interval` (and at
least `MIN_SAMPLES` of them, health checks included) waited longer than `target` does the worker
count as overloaded. While it is, a new proxied request whose own delay already exceeds the
target is refused at once; the rest are admitted. So the requests a worker accepts never queued
longer than the target (twice the target for a *light* key: one with fewer requests in flight
on the worker than the mean of the keys that have some, so a key that floods takes more of the
refusals). The worker stays overloaded until a whole interval passes in which no request waited
longer than the target. And whatever the state, a request that queued longer than a whole
interval is refused: that bounds the queueing of every accepted request from the first moment
of an overload on, before a whole interval of it has been seen. Requests already admitted are
never cut.

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

from gateway.edge.endpoints import ENDPOINTS, RESPONSE_ID
from gateway.edge.errors import error_body

logger = structlog.get_logger("gateway.edge.overload")

# At least this many late requests in a row make an overload: a few late ones are not a queue.
MIN_SAMPLES = 4
# A light key's request is admitted while its delay is within this many targets.
LIGHT_TARGETS = 2.0
# Nothing is refused while fewer admitted requests than this are unfinished on the worker: too
# few to make a queue of their own. What queues then is refusals, and clients that retry at once
# (a closed loop) keep their number whatever is refused, so refusing more would only trade
# answers for refusals until almost nothing is served.
MIN_IN_FLIGHT = 16
# Seconds a shed request is told to wait.
RETRY_AFTER_SECONDS = 1
OVERLOADED_BODY = error_body(503, "This gateway worker is overloaded; retry shortly.", "overloaded")
# The proxied endpoints: fixed POST paths, and the stored responses' GET and DELETE.
SHEDDABLE_POSTS = frozenset(spec.path for spec in ENDPOINTS if spec.method == "POST")
RESPONSES_PREFIX = next(
    spec.path.removesuffix(f"{{{RESPONSE_ID}}}") for spec in ENDPOINTS if spec.method == "GET"
)


@dataclass(frozen=True)
class SheddingPolicy:
    """When a worker counts as overloaded (see the module's description), and whether it then
    refuses requests (`enabled`) or only reports."""

    target: float  # seconds of queueing delay
    interval: float  # seconds
    enabled: bool = True


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
        self.in_flight = 0  # admitted requests not finished yet
        self.episodes = 0  # times the worker became overloaded
        self._clock = clock
        self._on_shed = on_shed
        self._on_interval = on_interval
        self._window_started = clock()
        self._window_smallest = math.inf
        self._window_samples = 0
        self._window_late = False
        self._late_since: float | None = None  # when the current run of late requests began
        self._late_run = 0  # late requests in that run
        self._episode_shed = 0

    @property
    def shedding(self) -> bool:
        """Whether new requests that waited past the target are refused now."""
        return self.overloaded and self.policy.enabled

    def admits(
        self, delay: float, *, sheddable: bool, light: Callable[[], bool] | None = None
    ) -> bool:
        """Take one request's queueing delay (seconds) and decide whether it is served.

        Only a `sheddable` request is ever refused; `light` (asked only when it matters) tells
        whether its key is light. A refusal is counted.
        """
        self.observe(delay)
        target = self.policy.target
        if not sheddable or delay <= target or not self.policy.enabled:
            return True
        if delay <= self.policy.interval and (
            not self.overloaded or self.in_flight < MIN_IN_FLIGHT
        ):
            return True
        if delay <= target * LIGHT_TARGETS and light is not None and light():
            return True
        self.shed += 1
        self._episode_shed += 1
        if self._on_shed is not None:
            self._on_shed()
        return False

    def observe(self, delay: float) -> None:
        """Count one request's queueing delay: a run of late requests that lasts a whole
        interval makes the worker overloaded."""
        now = self._clock()
        if now - self._window_started >= self.policy.interval:
            self.tick()
        self._window_smallest = min(self._window_smallest, delay)
        self._window_samples += 1
        if delay <= self.policy.target:
            self._late_since = None
            return
        self._window_late = True
        if self._late_since is None:
            self._late_since = now
            self._late_run = 0
        self._late_run += 1
        if (
            not self.overloaded
            and self._late_run >= MIN_SAMPLES
            and now - self._late_since >= self.policy.interval
        ):
            self.overloaded = True
            self.episodes += 1
            self._episode_shed = 0
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

    Only new proxied requests are sheddable: health, readiness, metrics, admin, the model list
    and the status page always reach the app.
    """

    def __init__(
        self,
        shedder: LoadShedder,
        *,
        light: Callable[[web.BaseRequest], bool],
        request_id: Callable[[], str],
    ) -> None:
        self.shedder = shedder
        self._light = light
        self._request_id = request_id

    def admit(self, request: web.BaseRequest, delay: float) -> web.Response | None:
        """None to serve the request (counted in flight until `finished`), or the 503 to answer
        instead; `delay`: the loop's CPU seconds spent since its head was read."""
        shedder = self.shedder
        if shedder.admits(delay, sheddable=sheddable(request), light=lambda: self._light(request)):
            shedder.in_flight += 1
            return None
        return web.Response(
            status=503,
            body=OVERLOADED_BODY,
            content_type="application/json",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS), "x-request-id": self._request_id()},
        )

    def finished(self) -> None:
        """An admitted request's handler returned."""
        self.shedder.in_flight -= 1


def sheddable(request: web.BaseRequest) -> bool:
    """Whether the request is a new proxied one (an endpoint of the table)."""
    path = request.raw_path.partition("?")[0]
    if request.method == "POST":
        return path in SHEDDABLE_POSTS
    return path.startswith(RESPONSES_PREFIX) and request.method in {"GET", "DELETE"}
