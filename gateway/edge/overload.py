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

Refusing only sheds load that does not come straight back. Clients that send their next request
the moment the last is answered, ignoring `Retry-After` (a closed loop), keep their number of
requests in the worker whatever is refused, so once they queue past the target, refusing every
late one only trades answers for refusals (measured, 128 such clients on one worker: 40 % of the
answers, and seven refusals for each). So when, past an overload's first `ONSET_INTERVALS`
intervals, refusals outnumber admissions `FUTILE_RATIO` to one for `FUTILE_INTERVALS` intervals
in a row while the worker's open connections stay put (an open-loop overload of 1.5x refuses a
third of its requests, and a flood opens connections as it queues), refusals *rest*: for one
`Retry-After` period, doubling while it goes on, only requests that queued longer than a whole
interval are refused. Such a loop is then served at the worker's full rate with the latency its
own number sets, and the target is tried again after each rest. A rest ends early if connections
open meanwhile (a closed loop keeps its number): the load was a flood of several times the
worker's capacity after all, which looks the same until it is no longer refused, and no rest
begins again for `MAX_REST_SECONDS`.

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
# Refusals rest (see the module's description) when, for `FUTILE_INTERVALS` intervals in a row,
# at least `MIN_FUTILE_REFUSALS` requests were refused and `FUTILE_RATIO` for each one admitted,
# not counting an overload's first `ONSET_INTERVALS` intervals.
FUTILE_RATIO = 3
FUTILE_INTERVALS = 2
ONSET_INTERVALS = 1
MIN_FUTILE_REFUSALS = 16
# A rest ends early once more than this many more client connections are open than when it
# began: a closed loop keeps its number, an open-loop flood opens more as it queues.
MAX_REST_GROWTH = 16
# ... and an interval in which more than this many more connections opened does not count
# towards a rest: a flood opens connections as it queues.
MAX_FUTILE_GROWTH = 8
# The first rest lasts `RETRY_AFTER_SECONDS`; each one that follows within this long of the last
# one's end doubles, up to this.
MAX_REST_SECONDS = 8.0
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
        on_rest: Callable[[], None] | None = None,
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
        self._on_rest = on_rest
        self._window_started = clock()
        self._window_smallest = math.inf
        self._window_samples = 0
        self._window_late = False
        self._late_since: float | None = None  # when the current run of late requests began
        self._late_run = 0  # late requests in that run
        self._episode_shed = 0
        self._window_admitted = 0  # sheddable requests admitted in the current interval
        self._window_refused = 0
        self._futile_run = 0  # intervals in a row whose refusals outnumbered admissions
        self._rest = 0.0  # seconds of the last rest
        self._resting_until = -math.inf
        self._no_rest_until = -math.inf  # after a rest that ended early: none before this
        self.rests = 0  # times refusals rested so far
        self.connections: Callable[[], int] = lambda: 0  # the worker's open client connections
        self._rest_connections = 0  # open connections when the current rest began
        self._judged_connections = 0  # open connections at the last judged interval

    @property
    def resting(self) -> bool:
        """Whether refusals rest now: only requests that queued past a whole interval are
        refused."""
        return self._clock() < self._resting_until

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
        if not sheddable:
            return True
        if self._admissible(delay, light):
            self._window_admitted += 1
            return True
        self._window_refused += 1
        self.shed += 1
        self._episode_shed += 1
        if self._on_shed is not None:
            self._on_shed()
        return False

    def _admissible(self, delay: float, light: Callable[[], bool] | None) -> bool:
        target, interval = self.policy.target, self.policy.interval
        if delay <= target or not self.policy.enabled:
            return True
        if self.resting:
            return delay <= interval
        if delay <= interval and (not self.overloaded or self.in_flight < MIN_IN_FLIGHT):
            return True
        return delay <= target * LIGHT_TARGETS and light is not None and light()

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
            # The backlog of an overload's first moments is refused whole, whatever the load.
            self._futile_run = -ONSET_INTERVALS
            self._judged_connections = self.connections()
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
        elif now < self._resting_until:
            opened = self.connections() - self._rest_connections
            if opened > MAX_REST_GROWTH:
                self._end_rest(now)
        elif self.shedding and now >= self._no_rest_until:
            self._judge_refusals(now)
        self._window_started = now
        self._window_smallest = math.inf
        self._window_samples = 0
        self._window_late = False
        self._window_admitted = self._window_refused = 0
        if self._on_interval is not None:
            self._on_interval(self.delay)

    def _judge_refusals(self, now: float) -> None:
        """After an interval of shedding: rest refusals once they stop shedding load."""
        refused, admitted = self._window_refused, self._window_admitted
        connections, before = self.connections(), self._judged_connections
        self._judged_connections = connections
        if (
            refused < MIN_FUTILE_REFUSALS
            or refused < FUTILE_RATIO * admitted
            or connections - before > MAX_FUTILE_GROWTH
        ):
            self._futile_run = 0
            return
        self._futile_run += 1
        if self._futile_run < FUTILE_INTERVALS:
            return
        self._futile_run = 0
        recent = now - self._resting_until <= MAX_REST_SECONDS
        self._rest = min(MAX_REST_SECONDS, self._rest * 2) if recent else RETRY_AFTER_SECONDS
        self._resting_until = now + self._rest
        self._rest_connections = self.connections()
        self.rests += 1
        if self._on_rest is not None:
            self._on_rest()
        logger.warning(
            "shedding_rests",
            refused=refused,
            admitted=admitted,
            rest_seconds=self._rest,
            reason="refused requests come straight back",
        )

    def _end_rest(self, now: float) -> None:
        """Connections opened while refusals rested, so they were shedding load (a flood, not
        a closed loop): resume them, and do not rest again for a while."""
        self._resting_until = now
        self._no_rest_until = now + MAX_REST_SECONDS
        logger.warning("shedding_rest_ended", reason="connections opened while refusals rested")


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

    def watch_connections(self, count: Callable[[], int]) -> None:
        """Let the shedder count the worker's open client connections."""
        self.shedder.connections = count


def sheddable(request: web.BaseRequest) -> bool:
    """Whether the request is a new proxied one (an endpoint of the table)."""
    path = request.raw_path.partition("?")[0]
    if request.method == "POST":
        return path in SHEDDABLE_POSTS
    return path.startswith(RESPONSES_PREFIX) and request.method in {"GET", "DELETE"}
