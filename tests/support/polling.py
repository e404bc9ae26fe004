"""A bounded poll: wait for a condition instead of sleeping a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Predicate = Callable[[], bool | Awaitable[bool]]


async def wait_until(
    predicate: Predicate,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - the poll itself is the bound; it fails as an assertion
    interval: float = 0.01,
    message: str = "condition",
) -> None:
    """Return once `predicate()` is true; AssertionError naming `message` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        outcome = predicate()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        await asyncio.sleep(interval)
