"""Store deadlines charge what is awaited, not the event loop's own lag."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.selection.deadlines import AdaptiveDeadline, await_within


async def answer_after(seconds: float) -> str:
    """An awaitable that answers after `seconds` of wall time."""
    await asyncio.sleep(seconds)
    return "answer"


async def test_an_answer_in_time_is_returned() -> None:
    """A call well inside its budget returns its result."""
    assert await await_within(answer_after(0.001), budget=0.05, limit=0.5) == "answer"


async def answer_in_turns(turns: int) -> str:
    """An awaitable that needs `turns` trips round the event loop, like a driver call does."""
    for _ in range(turns):
        await asyncio.sleep(0)
    return "answer"


async def test_a_congested_loop_is_not_charged_to_the_budget() -> None:
    """Five loop turns of 20 ms each (100 ms in all) still fit a 50 ms budget; a plain timeout
    of 50 ms gives up on the same call."""
    running = True

    async def hog_the_loop() -> None:
        while running:
            time.sleep(0.02)  # noqa: ASYNC251 - the point: each loop turn spends 20 ms here
            await asyncio.sleep(0)

    hog = asyncio.create_task(hog_the_loop())
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await answer_in_turns(5)
        assert await await_within(answer_in_turns(5), budget=0.05, limit=1.0) == "answer"
    finally:
        running = False
        await hog


async def test_a_slow_answer_times_out_near_its_budget_and_is_cancelled() -> None:
    """An answer that takes 2 s on an idle loop times out after about the budget."""
    slow = asyncio.ensure_future(answer_after(2.0))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await await_within(slow, budget=0.05, limit=1.0)
    assert time.monotonic() - started < 0.5
    assert slow.cancelled()


async def test_the_limit_bounds_the_wait_even_when_the_loop_lags() -> None:
    """However much lag is discounted, no call waits past its limit."""

    async def keep_blocking() -> None:
        for _ in range(20):
            await asyncio.sleep(0)
            time.sleep(0.02)  # noqa: ASYNC251 - starving the loop on purpose

    blocker = asyncio.create_task(keep_blocking())
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await await_within(answer_after(5.0), budget=0.2, limit=0.15)
    assert time.monotonic() - started < 0.5
    await blocker


def test_an_adaptive_deadline_follows_the_store_pace_within_bounds() -> None:
    """Configured when fast or unmeasured; twice the slowest recent call when slower; capped."""
    deadline = AdaptiveDeadline(0.05, limit_factor=10, limit_floor=0.1, multiple=2, window=4)
    assert deadline.budget() == 0.05
    for _ in range(4):
        deadline.observe(0.001)
    assert deadline.budget() == 0.05
    for seconds in (0.03, 0.06, 0.01, 0.02):
        deadline.observe(seconds)
    assert deadline.budget() == pytest.approx(0.12)
    for _ in range(4):
        deadline.observe(1.0)
    assert deadline.budget() == pytest.approx(0.5)
    for _ in range(4):
        deadline.observe(0.002)
    assert deadline.budget() == 0.05
