"""Background loops: how each one repeats, retries after a failure, is logged and is stopped.

Every loop kept running beside the requests goes through here, on tenacity:

- `keep_retrying`: a round that raises one of its expected failures runs again after the next
  wait of a `Backoff` table (its last wait repeats); a round that ends normally starts the table
  over. The change feed's reconnect (`affinity_store.notifications`).
- `every`: a sync run at an interval: the usage flush, the key-limit shares' registration
  heartbeat, the node load poller, the affinity janitor, the gauge refresher. A round that
  raises is logged and the next one runs at the next interval.
- `Backoff.delay`: the same table read by synchronous code that sleeps itself: the supervisor's
  worker restart back-off (`gateway.operations.serve`).

Each failed round is one `background_retry` line: the loop's name, the attempt number, the
delay before the next one and the exception's class, never its message (a driver's message can
hold a connection string). Each loop is stopped the same way: its task is cancelled and awaited
(`stop_task`); cancellation is never retried.

The hot path's failover loop (`gateway.dispatch.dispatcher`) stays plain code on purpose: it
never waits between attempts, counts a budget and catches one exception type, and tenacity's
per-call machinery (a retry state, its statistics, a strategy call per attempt) cost enough that
leaving it took the CPU per request to 0.78-0.86 of what it was. A background loop runs a round
every second or slower, where that cost is nothing and one declared, logged policy is worth
more.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_never,
    wait_chain,
    wait_fixed,
)
from tenacity.wait import wait_base

logger = structlog.get_logger("gateway.shared.background")

Round = Callable[[], Awaitable[object]]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Backoff:
    """Waits after consecutive failures: the n-th failure in a row waits `steps[n - 1]`, and
    every failure past the table waits its last step."""

    steps: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a back-off needs at least one step")

    def wait(self) -> wait_base:
        """The table as a tenacity wait strategy."""
        return wait_chain(*(wait_fixed(step) for step in self.steps))

    def delay(self, failures: int) -> float:
        """The wait after `failures` earlier failures in a row (0: the first failure's wait)."""
        state = RetryCallState(retry_object=Retrying(), fn=None, args=(), kwargs={})
        state.attempt_number = failures + 1
        return float(self.wait()(state))


def log_retry(loop: str, attempt: int, delay: float, error: str) -> None:
    """The one line every background loop logs for a failed round."""
    logger.info("background_retry", loop=loop, attempt=attempt, delay_seconds=delay, error=error)


def _logged_failures(loop: str) -> Callable[[RetryCallState], None]:
    """tenacity's `before_sleep` hook: one `background_retry` line when the round failed."""

    def before_sleep(state: RetryCallState) -> None:
        outcome = state.outcome
        if outcome is None or not outcome.failed:
            return
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        log_retry(loop, state.attempt_number, delay, type(outcome.exception()).__name__)

    return before_sleep


async def keep_retrying(
    loop: str,
    attempt: Round,
    *,
    retry_on: tuple[type[Exception], ...],
    backoff: Backoff,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Run `attempt` again and again until cancelled: after a raise of `retry_on`, following
    `backoff`; at once after a normal end, the back-off starting over. Any other exception
    ends the loop."""
    while True:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(retry_on),
            wait=backoff.wait(),
            stop=stop_never,
            before_sleep=_logged_failures(loop),
            sleep=sleep,
            reraise=True,
        )
        await retrying(attempt)


async def every(
    loop: str,
    step: Round,
    *,
    interval: float,
    wait_first: bool = False,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Run `step` every `interval` seconds (`sleep` waits out each interval) until cancelled;
    with `wait_first`, the first run comes after one interval. A step that raises an
    `Exception` is logged and the loop goes on."""
    if wait_first:
        await sleep(interval)
    repeating = AsyncRetrying(
        retry=retry_if_result(lambda _: True) | retry_if_exception_type(Exception),
        wait=wait_fixed(interval),
        stop=stop_never,
        before_sleep=_logged_failures(loop),
        sleep=sleep,
    )
    await repeating(step)


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel `task` (if any) and wait until it has ended; its cancellation is not re-raised."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
