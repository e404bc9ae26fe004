"""The store's circuit breaker: stop asking a failing store for a cool-off, then probe."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

BREAKER_FAILURE_THRESHOLD = 3

BreakerState = Literal["closed", "open", "half_open"]


class Breaker:
    """Opens after consecutive store failures; after the cool-off one probe may close it again.

    One slow call (a pause, a blip) degrades only its own request; it takes
    `failure_threshold` failures in a row to stop asking the store for a whole cool-off.
    """

    def __init__(
        self,
        cooloff_seconds: float,
        clock: Callable[[], float],
        *,
        failure_threshold: int = BREAKER_FAILURE_THRESHOLD,
    ) -> None:
        self._cooloff = cooloff_seconds
        self._clock = clock
        self._threshold = failure_threshold
        self._failures = 0
        self._last_counted = -math.inf
        self._open_until: float | None = None
        self._probing = False

    def state(self) -> BreakerState:
        """closed (calls flow), open (calls skipped) or half_open (one probe allowed)."""
        if self._open_until is None:
            return "closed"
        return "open" if self._clock() < self._open_until else "half_open"

    def allow(self) -> bool:
        """Whether a store call may be made now; in half-open state only one at a time."""
        state = self.state()
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        """A call worked: close."""
        self._failures = 0
        self._open_until = None
        self._probing = False

    def abandoned(self) -> None:
        """A call was cancelled before it finished: it proves nothing, so another may probe."""
        self._probing = False

    def failed(self, started: float | None = None) -> None:
        """A call that began at `started` failed or missed its deadline: open once enough
        failed in a row.

        Calls already in flight when the previous failure was counted failed in the same
        moment (a burst meeting one slow spell): they count once, not each. A failed probe
        (half-open) reopens at once.
        """
        self._probing = False
        if self._open_until is None and started is not None and started < self._last_counted:
            return
        self._failures += 1
        self._last_counted = self._clock()
        if self._open_until is not None or self._failures >= self._threshold:
            self._open_until = self._clock() + self._cooloff
