"""Per-process provider health: consecutive failures, cooldowns with back-off, and 429 waits.

Cooldowns are per process on purpose: each worker learns a provider is sick within
`allowed_fails` of its own requests, with no shared state to keep consistent or to lose.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.config import RoutingSettings


@dataclass
class _State:
    consecutive_failures: int = 0
    cooldowns_in_a_row: int = 0
    cooling_until: float = 0.0


class ProviderHealth:
    """Which providers are cooling down, and until when."""

    def __init__(
        self, routing: RoutingSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._allowed_fails = routing.allowed_fails
        self._base = routing.cooldown_seconds
        self._cap = routing.cooldown_max_seconds
        self._clock = clock
        self._states: dict[str, _State] = {}

    def reconfigure(self, routing: RoutingSettings, providers: Iterable[str]) -> None:
        """Apply reloaded cooldown settings; providers that stay keep their state."""
        self._allowed_fails = routing.allowed_fails
        self._base = routing.cooldown_seconds
        self._cap = routing.cooldown_max_seconds
        kept = set(providers)
        for name in [name for name in self._states if name not in kept]:
            del self._states[name]

    def _state(self, provider: str) -> _State:
        state = self._states.get(provider)
        if state is None:
            state = self._states[provider] = _State()
        return state

    def cooling(self, provider: str) -> bool:
        """Whether the provider is cooling down now."""
        state = self._states.get(provider)
        return state is not None and state.cooling_until > self._clock()

    def cooling_remaining(self, provider: str) -> float:
        """Seconds of cooldown left (0 when not cooling)."""
        state = self._states.get(provider)
        return 0.0 if state is None else max(0.0, state.cooling_until - self._clock())

    def soonest_recovery(self, providers: Iterable[str]) -> float:
        """Seconds until the first of these providers stops cooling."""
        return min((self.cooling_remaining(name) for name in providers), default=0.0)

    def succeeded(self, provider: str) -> None:
        """A success resets the failure count and the back-off."""
        state = self._states.get(provider)
        if state is not None:
            state.consecutive_failures = 0
            state.cooldowns_in_a_row = 0

    def failed(self, provider: str) -> bool:
        """Count a failure; after `allowed_fails` in a row, cool down. True when it started one."""
        state = self._state(provider)
        state.consecutive_failures += 1
        if state.consecutive_failures < self._allowed_fails:
            return False
        seconds = min(self._base * 2**state.cooldowns_in_a_row, self._cap)
        state.cooldowns_in_a_row += 1
        state.consecutive_failures = 0
        self._cool(state, seconds)
        return True

    def rate_limited(self, provider: str, retry_after: float | None) -> None:
        """A 429: cool for its Retry-After (capped), or the base cooldown when it gave none."""
        seconds = self._base if retry_after is None else retry_after
        self._cool(self._state(provider), min(seconds, self._cap))

    def _cool(self, state: _State, seconds: float) -> None:
        if math.isfinite(seconds) and seconds > 0:
            state.cooling_until = max(state.cooling_until, self._clock() + seconds)
