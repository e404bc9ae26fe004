"""The background loops' policy: back-off tables, retried rounds, periodic syncs, one log line."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from gateway.shared.background import Backoff, every, keep_retrying, stop_task

SECRET = "postgresql://gateway:hunter2@db/affinity"


class LostError(Exception):
    """An expected failure of a round."""


class BrokenError(Exception):
    """A failure the loop was not told to retry."""


def test_a_backoff_walks_its_table_and_keeps_its_last_step() -> None:
    """The n-th failure in a row waits the n-th step; every later one waits the last."""
    backoff = Backoff((0.5, 1.0, 2.0, 5.0))
    assert [backoff.delay(failures) for failures in range(7)] == [0.5, 1.0, 2.0, 5.0, 5.0, 5.0, 5.0]


def test_a_backoff_needs_a_step() -> None:
    """An empty table is refused when it is made."""
    with pytest.raises(ValueError, match="at least one step"):
        Backoff(())


async def test_keep_retrying_backs_off_and_starts_over_after_a_success() -> None:
    """Failures wait the table's steps in turn; a round that succeeds resets the back-off, and
    each failure is one line with the loop, attempt, delay and class, never the message."""
    outcomes: list[Exception | None] = [LostError(SECRET), LostError(SECRET), None, LostError()]
    waits: list[float] = []

    async def round_() -> None:
        if not outcomes:
            raise BrokenError
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    async def sleep(delay: float) -> None:
        waits.append(delay)

    with capture_logs() as logs, pytest.raises(BrokenError):
        await keep_retrying(
            "feed", round_, retry_on=(LostError,), backoff=Backoff((0.5, 1.0)), sleep=sleep
        )
    assert waits == [0.5, 1.0, 0.5]
    retries = [line for line in logs if line["event"] == "background_retry"]
    assert [(line["attempt"], line["delay_seconds"]) for line in retries] == [
        (1, 0.5),
        (2, 1.0),
        (1, 0.5),
    ]
    assert {line["loop"] for line in retries} == {"feed"}
    assert {line["error"] for line in retries} == {"LostError"}
    assert SECRET not in repr(logs)


async def test_every_runs_at_its_interval_and_outlives_a_failed_step() -> None:
    """A periodic sync waits first when asked, logs a failed step by its class and goes on."""
    calls: list[str] = []
    waits: list[float] = []
    done = asyncio.Event()

    async def step() -> None:
        calls.append("step")
        steps = calls.count("step")
        if steps == 2:
            raise BrokenError(SECRET)
        if steps == 4:
            done.set()
            await asyncio.Event().wait()  # parked until cancelled

    async def sleep(delay: float) -> None:
        waits.append(delay)
        calls.append("wait")

    with capture_logs() as logs:
        task = asyncio.create_task(every("sync", step, interval=3.0, wait_first=True, sleep=sleep))
        await asyncio.wait_for(done.wait(), timeout=5)
        await stop_task(task)
    assert calls == ["wait", "step", "wait", "step", "wait", "step", "wait", "step"]
    assert waits == [3.0, 3.0, 3.0, 3.0]
    retries = [line for line in logs if line["event"] == "background_retry"]
    assert [(line["loop"], line["attempt"], line["error"]) for line in retries] == [
        ("sync", 2, "BrokenError")
    ]
    assert SECRET not in repr(logs)
    assert task.cancelled()


async def test_a_cancelled_loop_is_never_retried() -> None:
    """Cancelling a loop mid-round ends it: the cancellation is not a failure to retry."""
    started = asyncio.Event()
    rounds = 0

    async def round_() -> None:
        nonlocal rounds
        rounds += 1
        started.set()
        await asyncio.Event().wait()

    with capture_logs() as logs:
        task = asyncio.create_task(
            keep_retrying("feed", round_, retry_on=(Exception,), backoff=Backoff((0.0,)))
        )
        await asyncio.wait_for(started.wait(), timeout=5)
        await stop_task(task)
    assert task.cancelled()
    assert rounds == 1
    assert [line for line in logs if line["event"] == "background_retry"] == []


async def test_stop_task_accepts_no_task() -> None:
    """Stopping a loop that never started does nothing."""
    await stop_task(None)
